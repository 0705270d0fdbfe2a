"""Chaining foundation models: visual programs (a safe, typed VisProg-style language and a
dependency-graph executor) and CuPL label sets (LLM-written class descriptions -> CLIP
classifiers stored as named, versioned artifacts).

    from fmrt.chain import parse_program, Executor, builtin_modules
    prog = parse_program("N=Count(object=OBJ)\\nRESULT=N", inputs={"OBJ": "ObjectList"})

Submodules: ``program`` (language, types, module signatures), ``expr`` (safe ``Eval``
expressions), ``executor`` (graph execution, per-run cache, traces), ``cupl`` (text-generation
sources, CuPL prompts, description cache, ShapesWorld offline describer, evaluation),
``labelsets`` (label-set artifacts and their on-disk store).
"""
from fmrt.chain.executor import (Executor, RunCache, RunResult, StepContext, StepError,
                                 builtin_modules)
from fmrt.chain.expr import Expr, ExprError, parse_expr
from fmrt.chain.program import (MODULES, ModuleRegistry, ModuleSpec, ObjectList, Program,
                                ProgramError, VType, parse_program)

__all__ = ["Executor", "RunCache", "RunResult", "StepContext", "StepError", "builtin_modules",
           "Expr", "ExprError", "parse_expr", "MODULES", "ModuleRegistry", "ModuleSpec",
           "ObjectList", "Program", "ProgramError", "VType", "parse_program"]
