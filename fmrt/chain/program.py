"""The visual-program language: one step a line, parsed into a typed, validated program.

    BOX0=Loc(image=LEFT, object='circle')
    N0=Count(object=BOX0)
    ANSWER0=Vqa(image=RIGHT, question='How many circles are there?')
    OK=Eval(expr='{N0} + {ANSWER0} == 3')
    RESULT=OK

Grammar (per non-blank, non-``#`` line)::

    step    := NAME '=' MODULE '(' [arg (',' arg)*] ')'  |  'RESULT' '=' (NAME | literal | call)
    arg     := [ARGNAME '='] value           # positional args bind in signature order
    value   := 'string' | "string" | int | float | True | False | None | NAME

A program is a dataflow graph, not a script: a step may name a variable defined on a later line
(the executor orders by dependencies), but every variable is assigned exactly once and the graph
must be acyclic. ``parse_program`` checks everything before anything runs and raises
``ProgramError`` (``.line``, ``.reason``) for: over-long lines/programs, too many steps, syntax,
unknown modules, unknown/duplicate/missing arguments, wrong types, undefined variables,
re-assignment, cycles, a missing or non-final ``RESULT``, and bad ``Eval`` expressions.

Values are typed (``VType``): ``Image`` (``H x W x 3`` uint8), ``ObjectList`` (boxes, masks,
scores, labels), ``Text``, ``Number``, ``Bool``, ``TextList``. A module's signature
(``ModuleSpec``) gives argument names, types and defaults and the output type; ``MODULES`` holds
VisProg's module set (the implementations are plugged in by the executor). Parsing uses ``ast``
on one line at a time and only reads the node shapes above; nothing is evaluated.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fmrt.chain import expr as X

MAX_STEPS = 64  # VisProg's longest in-context examples have ~8 steps
MAX_LINES = 256
MAX_LINE_CHARS = 1000
MAX_PROGRAM_CHARS = 20_000
MAX_LITERAL_CHARS = 500
MAX_NAME_CHARS = 64
RESULT = "RESULT"


class ProgramError(ValueError):
    """A program rejected before (or failing during) execution: ``line`` (1-based, 0 = whole
    program) and ``reason``."""

    def __init__(self, reason: str, line: int = 0) -> None:
        self.reason, self.line = reason, int(line)
        super().__init__(f"line {line}: {reason}" if line else reason)

    def __reduce__(self):  # picklable across Ray/processes
        return (ProgramError, (self.reason, self.line))

    def to_dict(self) -> Dict[str, Any]:
        return {"line": self.line, "reason": self.reason}


# ---------------------------------------------------------------------------------- value types
class VType(str, Enum):
    IMAGE = "Image"
    OBJECTS = "ObjectList"
    TEXT = "Text"
    NUMBER = "Number"
    BOOL = "Bool"
    TEXTLIST = "TextList"
    EXPR = "Expr"  # a string literal parsed as an Eval expression at validation time
    SCALAR = "Scalar"  # Number | Bool | Text (Eval results whose kind is only known at runtime)
    ANY = "Any"

    def __str__(self) -> str:
        return self.value


SCALARS = (VType.NUMBER, VType.BOOL, VType.TEXT, VType.SCALAR)


def assignable(src: VType, dst: VType) -> bool:
    """Can a value of static type ``src`` be passed where ``dst`` is expected?"""
    if dst is VType.ANY or src is dst:
        return True
    if src is VType.SCALAR:
        return dst in SCALARS
    if dst is VType.SCALAR:
        return src in SCALARS
    if dst is VType.TEXTLIST and src is VType.TEXT:  # 'a,b,c' or one Text value
        return True
    return False


@dataclass
class ObjectList:
    """Detected/segmented objects of one image.

    ``boxes``: ``N x 4`` float32 ``(x0, y0, x1, y1)`` pixels, inclusive-exclusive;
    ``masks``: ``N x H x W`` bool or None; ``scores``: ``N`` float32; ``labels``: N strings;
    ``image_size``: ``(H, W)`` of the image they were found in."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: List[str]
    masks: Optional[np.ndarray] = None
    image_size: Tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = self.boxes.shape[0]
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = [str(x) for x in self.labels]
        if self.scores.shape[0] != n or len(self.labels) != n:
            raise ValueError(f"ObjectList: {n} boxes, {self.scores.shape[0]} scores, "
                             f"{len(self.labels)} labels")
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
            if self.masks.ndim != 3 or self.masks.shape[0] != n:
                raise ValueError(f"ObjectList: masks must be {n} x H x W, got {self.masks.shape}")
            if self.image_size == (0, 0):
                self.image_size = tuple(int(s) for s in self.masks.shape[1:])

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, image_size: Tuple[int, int] = (0, 0)) -> "ObjectList":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], None, image_size)

    def subset(self, idx: Sequence[int]) -> "ObjectList":
        idx = list(idx)
        return ObjectList(self.boxes[idx], self.scores[idx], [self.labels[i] for i in idx],
                          None if self.masks is None else self.masks[idx], self.image_size)


def type_of(value: Any) -> Optional[VType]:
    """Runtime type of a value (None if it is not a program value)."""
    if isinstance(value, bool):
        return VType.BOOL
    if isinstance(value, (int, float, np.integer, np.floating)):
        return VType.NUMBER
    if isinstance(value, str):
        return VType.TEXT
    if isinstance(value, ObjectList):
        return VType.OBJECTS
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] == 3 \
            and value.dtype == np.uint8:
        return VType.IMAGE
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return VType.TEXTLIST
    return None


def conforms(value: Any, t: VType) -> bool:
    vt = type_of(value)
    return vt is not None and assignable(vt, t)


# ---------------------------------------------------------------------------------- signatures
_REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    type: VType
    default: Any = _REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class ModuleSpec:
    """A module's signature: ``args`` (positional order), ``output`` type, one-line ``doc``."""

    name: str
    args: Tuple[Arg, ...]
    output: VType
    doc: str = ""

    def arg(self, name: str) -> Optional[Arg]:
        return next((a for a in self.args if a.name == name), None)

    def describe(self) -> str:
        parts = [a.name + ("" if a.required else f"={a.default!r}") + f": {a.type}"
                 for a in self.args]
        return f"{self.name}({', '.join(parts)}) -> {self.output}"


def _m(name, output, doc, *args) -> ModuleSpec:
    return ModuleSpec(name, tuple(args), output, doc)


I, O, T, N, B, TL = VType.IMAGE, VType.OBJECTS, VType.TEXT, VType.NUMBER, VType.BOOL, VType.TEXTLIST

#: VisProg's module set (Gupta et al. 2023, table 1, without the generative/face modules).
STANDARD_MODULES: Tuple[ModuleSpec, ...] = (
    _m("Loc", O, "open-vocabulary localisation of `object` (VLM pointing + SAM, or SAM masks + "
       "CLIP selection)", Arg("image", I), Arg("object", T)),
    _m("Seg", O, "segment everything (SAM automatic masks)", Arg("image", I)),
    _m("Select", O, "keep the objects that best match `query` (CLIP on crops)",
       Arg("image", I), Arg("object", O), Arg("query", T), Arg("category", T, None)),
    _m("Classify", O, "label each object with one of `categories` (CLIP on crops)",
       Arg("image", I), Arg("object", O), Arg("categories", TL)),
    _m("Vqa", T, "answer `question` about the image (VLM)", Arg("image", I), Arg("question", T)),
    _m("Count", N, "number of objects", Arg("object", O)),
    _m("Crop", I, "crop the image to the union of the objects' boxes", Arg("image", I),
       Arg("object", O)),
    _m("CropLeftOf", I, "the part of the image left of the objects", Arg("image", I),
       Arg("object", O)),
    _m("CropRightOf", I, "the part of the image right of the objects", Arg("image", I),
       Arg("object", O)),
    _m("CropAbove", I, "the part of the image above the objects", Arg("image", I),
       Arg("object", O)),
    _m("CropBelow", I, "the part of the image below the objects", Arg("image", I),
       Arg("object", O)),
    _m("ColorPop", I, "keep the objects in colour, the rest grayscale", Arg("image", I),
       Arg("object", O)),
    _m("BgBlur", I, "blur everything but the objects", Arg("image", I), Arg("object", O)),
    _m("Tag", I, "draw the objects' boxes and labels", Arg("image", I), Arg("object", O)),
    _m("Eval", VType.SCALAR, "arithmetic/comparison/boolean expression over program variables",
       Arg("expr", VType.EXPR)),
    _m("List", TL, "a list of up to `max` items answering `query` (text-generation client)",
       Arg("query", T), Arg("max", N, 5)),
    _m("Result", VType.ANY, "the program's result", Arg("var", VType.ANY)),
)


class ModuleRegistry:
    """Name -> ``ModuleSpec``; ``register`` adds or replaces one (e.g. a test module)."""

    def __init__(self, specs: Sequence[ModuleSpec] = STANDARD_MODULES) -> None:
        self._specs: Dict[str, ModuleSpec] = {}
        for s in specs:
            self.register(s)

    def register(self, spec: ModuleSpec) -> ModuleSpec:
        if not X.is_identifier(spec.name):
            raise ValueError(f"invalid module name {spec.name!r}")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> Optional[ModuleSpec]:
        return self._specs.get(name)

    def names(self) -> List[str]:
        return sorted(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def describe(self) -> str:
        return "\n".join(self._specs[n].describe() for n in self.names())


MODULES = ModuleRegistry()


# ---------------------------------------------------------------------------------- program
@dataclass(frozen=True)
class Ref:
    """A reference to a program variable (an input image or an earlier step's output)."""

    name: str


Value = Union[str, int, float, bool, None, Ref, X.Expr]


@dataclass
class Step:
    line: int
    target: str
    module: str
    args: Dict[str, Value]
    output: VType
    deps: Tuple[str, ...] = ()  # variables read (refs + Eval expression names), in order
    source: str = ""

    def to_dict(self) -> Dict[str, Any]:
        def show(v):
            if isinstance(v, Ref):
                return {"ref": v.name}
            if isinstance(v, X.Expr):
                return {"expr": v.source}
            return v
        return {"line": self.line, "target": self.target, "module": self.module,
                "args": {k: show(v) for k, v in self.args.items()}, "output": str(self.output),
                "deps": list(self.deps)}


@dataclass
class Program:
    """A validated program: ``steps`` in source order, ``inputs`` (name -> type), ``result``
    (the variable RESULT names), ``order`` (a topological order of step targets)."""

    source: str
    inputs: Dict[str, VType]
    steps: List[Step]
    result: str
    result_type: VType
    order: List[str] = field(default_factory=list)

    @property
    def by_target(self) -> Dict[str, Step]:
        return {s.target: s for s in self.steps}

    def to_dict(self) -> Dict[str, Any]:
        return {"inputs": {k: str(v) for k, v in self.inputs.items()},
                "steps": [s.to_dict() for s in self.steps], "result": self.result,
                "result_type": str(self.result_type)}


_ASSIGN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)\s*(.*?)\s*$", re.S)


def _literal_or_ref(node: ast.AST, line: int, where: str) -> Value:
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (bool, int, float)):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > X.MAX_ABS_NUMBER:
                raise ProgramError(f"{where}: number literal out of range", line)
            if isinstance(v, float) and not np.isfinite(v):
                raise ProgramError(f"{where}: number literal out of range", line)
            return v
        if isinstance(v, str):
            if len(v) > MAX_LITERAL_CHARS:
                raise ProgramError(f"{where}: string literal has {len(v)} characters; the limit "
                                   f"is {MAX_LITERAL_CHARS}", line)
            return v
        raise ProgramError(f"{where}: {type(v).__name__} literals are not allowed", line)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) \
            and not isinstance(node.operand.value, bool):
        return _literal_or_ref(ast.Constant(-node.operand.value), line, where)
    if isinstance(node, ast.Name):
        _check_name(node.id, line)
        return Ref(node.id)
    kind = {ast.Call: "a nested module call", ast.Attribute: "attribute access",
            ast.Subscript: "a subscript", ast.BinOp: "an operator expression (use Eval)",
            ast.Compare: "a comparison (use Eval)", ast.BoolOp: "a boolean expression (use Eval)",
            ast.List: "a list (use a 'a,b,c' string)", ast.JoinedStr: "an f-string",
            ast.Lambda: "a lambda"}.get(type(node), f"a {type(node).__name__} expression")
    raise ProgramError(f"{where}: {kind} is not a value; values are literals or variable names",
                       line)


def _check_name(name: str, line: int) -> None:
    if name.startswith("_"):
        raise ProgramError(f"name {name!r} is not allowed (underscore names are reserved)", line)
    if len(name) > MAX_NAME_CHARS:
        raise ProgramError(f"name {name[:20]!r}... is longer than {MAX_NAME_CHARS} characters",
                           line)


def _parse_rhs(rhs: str, line: int) -> ast.AST:
    try:
        tree = ast.parse(rhs, mode="eval")
    except SyntaxError as e:
        raise ProgramError(f"syntax error: {e.msg}", line) from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise ProgramError(f"line too complex to parse: {type(e).__name__}", line) from None
    return tree.body


def parse_program(text: str, inputs: Optional[Mapping[str, Union[VType, str]]] = None, *,
                  modules: ModuleRegistry = MODULES, max_steps: int = MAX_STEPS) -> Program:
    """Parse and validate ``text``. ``inputs``: named input values and their types (default
    ``{"IMAGE": Image}``). Raises ``ProgramError`` with the line and reason."""
    if not isinstance(text, str):
        raise ProgramError(f"a program must be text, got {type(text).__name__}")
    if len(text) > MAX_PROGRAM_CHARS:
        raise ProgramError(f"program has {len(text)} characters; the limit is "
                           f"{MAX_PROGRAM_CHARS}")
    if "\x00" in text:
        raise ProgramError("program contains a NUL character")
    in_types: Dict[str, VType] = {}
    for k, v in (inputs if inputs is not None else {"IMAGE": VType.IMAGE}).items():
        if not isinstance(k, str) or not X.is_identifier(k):
            raise ProgramError(f"invalid input name {k!r}")
        try:
            in_types[k] = VType(v)
        except ValueError:
            raise ProgramError(f"input {k!r} has unknown type {v!r}; types: "
                               f"{[t.value for t in VType]}") from None
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise ProgramError(f"program has {len(lines)} lines; the limit is {MAX_LINES}")

    steps: List[Step] = []
    defined: Dict[str, int] = {k: 0 for k in in_types}  # name -> defining line (0 = input)
    result: Optional[Tuple[int, str]] = None
    pending_result_step: Optional[Step] = None
    for ln, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if len(raw) > MAX_LINE_CHARS:
            raise ProgramError(f"line has {len(raw)} characters; the limit is {MAX_LINE_CHARS}",
                               ln)
        if result is not None:
            raise ProgramError("steps after RESULT; RESULT must be the last line", ln)
        m = _ASSIGN.match(s)
        if not m:
            raise ProgramError("expected NAME=Module(arg=value, ...) or RESULT=NAME", ln)
        target, rhs = m.group(1), m.group(2)
        _check_name(target, ln)
        if not rhs:
            raise ProgramError(f"nothing after '{target}='", ln)
        node = _parse_rhs(rhs, ln)
        if target == RESULT and not isinstance(node, ast.Call):
            val = _literal_or_ref(node, ln, "RESULT")
            if isinstance(val, Ref):
                result = (ln, val.name)
            else:  # a literal result: a Result step holding it
                pending_result_step = Step(ln, RESULT, "Result", {"var": val}, VType.ANY, (), s)
                result = (ln, RESULT)
            continue
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ProgramError("expected Module(arg=value, ...) after '='", ln)
        if target in defined:
            where = "an input" if defined[target] == 0 else f"line {defined[target]}"
            raise ProgramError(f"variable {target!r} is already defined ({where}); each "
                               "variable is assigned once", ln)
        if target in modules:
            raise ProgramError(f"variable name {target!r} is a module name", ln)
        if len(steps) + 1 > max_steps:
            raise ProgramError(f"program has more than {max_steps} steps", ln)
        step = _parse_call(node, target, ln, s, modules)
        steps.append(step)
        defined[target] = ln
        if target == RESULT:
            result = (ln, RESULT)
    if pending_result_step is not None:
        if len(steps) + 1 > max_steps:
            raise ProgramError(f"program has more than {max_steps} steps",
                               pending_result_step.line)
        steps.append(pending_result_step)
        defined[RESULT] = pending_result_step.line
    if result is None:
        raise ProgramError("the program has no final RESULT=... line")
    if result[1] not in defined:
        raise ProgramError(f"RESULT names undefined variable {result[1]!r}", result[0])

    # ---- names, types (in dependency order, so forward references type-check), cycles
    by_target = {st.target: st for st in steps}
    for st in steps:
        for d in st.deps:
            if d not in defined:
                hint = (f"; inputs are {sorted(in_types)}" if in_types else "")
                raise ProgramError(f"undefined variable {d!r}{hint}", st.line)
    order = _toposort(steps, by_target)
    types: Dict[str, VType] = dict(in_types)
    for name in order:
        st = by_target[name]
        _typecheck(st, types, modules)
        types[name] = st.output
    rline, rname = result
    if rname not in defined:
        raise ProgramError(f"RESULT names undefined variable {rname!r}", rline)
    return Program(source=text, inputs=in_types, steps=steps, result=rname,
                   result_type=types[rname], order=order)


def _parse_call(node: ast.Call, target: str, ln: int, src: str,
                modules: ModuleRegistry) -> Step:
    mod = node.func.id
    spec = modules.get(mod)
    if spec is None:
        raise ProgramError(f"unknown module {mod!r}; modules: {', '.join(modules.names())}", ln)
    args: Dict[str, Value] = {}
    if len(node.args) > len(spec.args):
        raise ProgramError(f"{mod} takes at most {len(spec.args)} positional arguments, got "
                           f"{len(node.args)}", ln)
    for a, v in zip(spec.args, node.args):
        if isinstance(v, ast.Starred):
            raise ProgramError(f"{mod}: starred arguments are not allowed", ln)
        args[a.name] = _literal_or_ref(v, ln, f"{mod} argument {a.name!r}")
    for kw in node.keywords:
        if kw.arg is None:
            raise ProgramError(f"{mod}: **arguments are not allowed", ln)
        if spec.arg(kw.arg) is None:
            raise ProgramError(f"{mod} has no argument {kw.arg!r}; arguments: "
                               f"{[a.name for a in spec.args]}", ln)
        if kw.arg in args:
            raise ProgramError(f"{mod}: argument {kw.arg!r} given twice", ln)
        args[kw.arg] = _literal_or_ref(kw.value, ln, f"{mod} argument {kw.arg!r}")
    for a in spec.args:
        if a.name not in args:
            if a.required:
                raise ProgramError(f"{mod} is missing required argument {a.name!r}", ln)
            args[a.name] = a.default
    deps: Dict[str, None] = {}
    for a in spec.args:
        v = args[a.name]
        if a.type is VType.EXPR:
            if isinstance(v, Ref):
                raise ProgramError(f"{mod} argument {a.name!r} must be an expression string, "
                                   f"not the variable {v.name!r}", ln)
            if not isinstance(v, str):
                raise ProgramError(f"{mod} argument {a.name!r} must be an expression string", ln)
            try:
                e = X.parse_expr(v)
            except X.ExprError as err:
                raise ProgramError(f"{mod} expression: {err}", ln) from None
            args[a.name] = e
            for n in e.names:
                deps.setdefault(n, None)
        elif isinstance(v, Ref):
            deps.setdefault(v.name, None)
    if target in deps:
        raise ProgramError(f"step {target!r} reads its own output (cycle)", ln)
    return Step(ln, target, mod, args, spec.output, tuple(deps), src)


def _toposort(steps: List[Step], by_target: Dict[str, Step]) -> List[str]:
    """Kahn's algorithm in source order; a leftover means a cycle, reported with its path."""
    indeg = {st.target: sum(1 for d in st.deps if d in by_target) for st in steps}
    users: Dict[str, List[str]] = {}
    for st in steps:
        for d in st.deps:
            if d in by_target:
                users.setdefault(d, []).append(st.target)
    ready = [st.target for st in steps if indeg[st.target] == 0]
    order: List[str] = []
    while ready:
        t = ready.pop(0)
        order.append(t)
        for u in users.get(t, ()):
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) < len(steps):
        left = [st for st in steps if st.target not in set(order)]
        # walk deps inside the leftover set until a name repeats: that is the cycle
        start, path, seen = left[0].target, [], {}
        cur = start
        while cur not in seen:
            seen[cur] = len(path)
            path.append(cur)
            cur = next(d for d in by_target[cur].deps if d in by_target and
                       d not in set(order))
        cyc = path[seen[cur]:] + [cur]
        line = min(by_target[n].line for n in cyc[:-1])
        raise ProgramError("cycle: " + " -> ".join(f"{n} (line {by_target[n].line})"
                                                   for n in cyc), line)
    return order


def _typecheck(st: Step, types: Dict[str, VType], modules: ModuleRegistry) -> None:
    spec = modules.get(st.module)
    for a in spec.args:
        v = st.args[a.name]
        if isinstance(v, X.Expr):
            kinds = {}
            for n in v.names:
                t = types[n]
                if t not in SCALARS:
                    raise ProgramError(f"{st.module} expression reads {n!r}, a {t}; expressions "
                                       "read Number, Bool or Text variables (use Count for "
                                       "objects)", st.line)
                kinds[n] = t.value
            k = v.infer(kinds)
            st.output = VType(k) if k in (X.NUMBER, X.BOOL, X.TEXT) else VType.SCALAR
            continue
        if isinstance(v, Ref):
            t = types[v.name]
            if not assignable(t, a.type):
                raise ProgramError(f"{st.module} argument {a.name!r} expects {a.type}, but "
                                   f"{v.name!r} is {_article(t)} {t}", st.line)
            continue
        if v is None:
            if a.required or a.default is not None:
                raise ProgramError(f"{st.module} argument {a.name!r} expects {a.type}, got None",
                                   st.line)
            continue
        lt = type_of(v)
        if lt is None or not assignable(lt, a.type):
            raise ProgramError(f"{st.module} argument {a.name!r} expects {a.type}, got "
                               f"{_article(lt) if lt else 'a'} {lt or type(v).__name__} "
                               f"literal {v!r}", st.line)
        if a.type in (VType.IMAGE, VType.OBJECTS):  # unreachable: no literal has these types
            raise ProgramError(f"{st.module} argument {a.name!r} needs a variable", st.line)
    if st.module == "Result":
        v = st.args["var"]
        st.output = types[v.name] if isinstance(v, Ref) else (type_of(v) or VType.ANY)


def _article(t) -> str:
    return "an" if str(t)[:1] in "AEIOU" else "a"


__all__ = ["ProgramError", "VType", "ObjectList", "Arg", "ModuleSpec", "ModuleRegistry",
           "MODULES", "STANDARD_MODULES", "Program", "Step", "Ref", "parse_program", "type_of",
           "conforms", "assignable", "MAX_STEPS", "MAX_LINE_CHARS", "MAX_PROGRAM_CHARS"]
