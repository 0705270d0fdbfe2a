"""Chaining foundation models: visual programs (a safe, typed VisProg-style language and a
dependency-graph executor) and CuPL label sets (LLM-written class descriptions -> CLIP
classifiers stored as named, versioned artifacts).

    from fmrt.chain import parse_program, Executor, builtin_modules
    prog = parse_program("N=Count(object=OBJ)\\nRESULT=N", inputs={"OBJ": "ObjectList"})

Submodules: ``program`` (language, types, module signatures), ``expr`` (safe ``Eval``
expressions), ``executor`` (graph execution, per-run cache, traces), ``cupl`` (text-generation
sources, CuPL prompts, description cache, ShapesWorld offline describer, evaluation),
``labelsets`` (label-set artifacts and their on-disk store), ``generate`` (instruction ->
validated program: in-context prompts for any text client, the bundled program LM), ``tasks``
(ShapesWorld program tasks scored against ground truth), ``modules`` (the model-backed modules
Loc/Seg/Select/Classify/Vqa/List, in process: ``local_modules(clip, sam, vlm)``, or over Ray
Serve handles).
"""
from fmrt.chain.executor import (Executor, NoReuseCache, RunCache, RunResult, StepContext,
                                 StepError, builtin_modules)
from fmrt.chain.expr import Expr, ExprError, parse_expr
from fmrt.chain.program import (MODULES, ModuleRegistry, ModuleSpec, ObjectList, Program,
                                ProgramError, VType, parse_program)

from fmrt.chain.modules import local_modules  # noqa: E402

__all__ = ["Executor", "NoReuseCache", "local_modules", "RunCache", "RunResult", "StepContext", "StepError", "builtin_modules",
           "Expr", "ExprError", "parse_expr", "MODULES", "ModuleRegistry", "ModuleSpec",
           "ObjectList", "Program", "ProgramError", "VType", "parse_program"]
