"""Safe ``Eval`` expressions for visual programs: parsed by ``ast``, walked through an
allow-list, evaluated by this module's own interpreter (never ``eval``/``exec``).

VisProg (Gupta et al. 2023) runs ``Eval('{ANSWER0} + {ANSWER1} == 6')`` by substituting the
answers into the string and calling Python's ``eval``: an LLM-written (or user-written) program can
then run any Python. Here an expression may only contain

* numbers (``|x| <= MAX_ABS_NUMBER``), ``True``/``False``/``None``, short string literals;
* names of program variables (never dunder names, never builtins: ``len`` is "undefined");
* ``+ - * / // %``, ``**`` with an integer exponent of at most ``MAX_EXPONENT`` and a bounded
  result, unary ``- + not``;
* comparisons ``== != < <= > >=`` (chained), ``in``/``not in`` on text, ``and``/``or``,
  ``a if cond else b``.

Everything else (attributes, calls, subscripts, lambdas, comprehensions, f-strings, starred,
walrus, containers) is rejected before evaluation with an ``ExprError`` naming the construct.
Size is bounded before ``ast.parse`` sees the text (``MAX_EXPR_CHARS``, bracket nesting
``MAX_DEPTH``), so a 10^4-term sum or 1000 nested parentheses is rejected in microseconds instead
of exhausting the parser's recursion; the tree is then bounded in node count and depth, and every
intermediate value is checked (a number over ``MAX_ABS_NUMBER``, a string over ``MAX_STR_CHARS``)
so ``9**9**9`` or ``'a' * 10**9`` fail on the first oversized operation without allocating.

``{NAME}`` placeholders (VisProg's spelling) are accepted and mean the variable ``NAME``; the
value is never pasted into the text.

Text values take part in arithmetic and comparisons with numbers when they *are* numbers: a
decimal numeral ("2", "3.5") or a number word ("zero".."twelve"), which is what a VQA module
answers to "how many ...?". In ``and``/``or``/``not`` and as an ``if`` condition, text
"yes"/"true" is true and "no"/"false"/"" is false; other text there is an error (Python would
call ``"no"`` true).
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

MAX_EXPR_CHARS = 1000  # one Eval line of VisProg's NLVR programs is ~80 characters
MAX_DEPTH = 32  # bracket nesting and AST depth
MAX_NODES = 256  # AST nodes (a 1000-char expression of single-digit sums has ~1000)
MAX_ABS_NUMBER = 10 ** 18  # any literal or intermediate number
MAX_EXPONENT = 64  # ``**`` exponent bound (2**64 already exceeds MAX_ABS_NUMBER)
MAX_STR_CHARS = 4096  # any literal or intermediate string

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")
_WORD_VALUE = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUMERAL = re.compile(r"^[+-]?(\d{1,18}(\.\d{0,12})?|\.\d{1,12})$")
_PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Result kinds of static inference (program.py maps them onto its value types).
NUMBER, BOOL, TEXT, SCALAR = "Number", "Bool", "Text", "Scalar"


class ExprError(ValueError):
    """A rejected or failed expression; ``str()`` is the reason a user can act on."""


# ---------------------------------------------------------------------------------- parsing
def _prescan(text: str) -> None:
    """Bound size and bracket nesting *before* ``ast.parse``: CPython's parser recurses per
    nesting level (and raises MemoryError/RecursionError, not SyntaxError, on deep input)."""
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression has {len(text)} characters; the limit is {MAX_EXPR_CHARS}")
    if "\x00" in text:
        raise ExprError("expression contains a NUL character")
    depth, quote, i = 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ExprError(f"expression nests brackets more than {MAX_DEPTH} deep")
        elif c in ")]}":
            depth -= 1
        i += 1


def _strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: m.group(1), text)


_BINOPS: Dict[type, Tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv), ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod), ast.Pow: ("**", operator.pow),
}
_CMPOPS: Dict[type, Tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b),
}
_REJECTED = {
    ast.Attribute: "attribute access is", ast.Call: "function calls are",
    ast.Subscript: "subscripts are", ast.Lambda: "lambdas are", ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are", ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are", ast.Starred: "starred values are",
    ast.NamedExpr: "assignment expressions (:=) are", ast.List: "lists are",
    ast.Tuple: "tuples are", ast.Set: "sets are", ast.Dict: "dicts are", ast.Await: "await is",
    ast.YieldFrom: "yield is", ast.Yield: "yield is", ast.Slice: "slices are",
}


class Expr:
    """A validated expression. ``names``: the program variables it reads; ``eval(env)`` runs it.

    Build with :func:`parse_expr`."""

    def __init__(self, source: str, tree: ast.Expression, names: Tuple[str, ...]) -> None:
        self.source, self.tree, self.names = source, tree, names

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"

    def infer(self, types: Mapping[str, str]) -> str:
        """Static result kind (``Number``/``Bool``/``Text``/``Scalar``) given variable kinds."""
        return _infer(self.tree.body, types)

    def eval(self, env: Mapping[str, Any]) -> Any:
        return _Interp(env).run(self.tree.body)


def parse_expr(text: str, variables: Optional[Set[str]] = None) -> Expr:
    """Parse and allow-list ``text``. With ``variables``, every name must be one of them.

    Raises ``ExprError`` with the reason; never evaluates anything."""
    _prescan(text)
    src = _strip_placeholders(text).strip()
    if not src:
        raise ExprError("empty expression")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise ExprError(f"invalid expression syntax: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:  # belt and braces after _prescan
        raise ExprError(f"expression too complex: {type(e).__name__}") from None
    names: Dict[str, Tuple[int, int]] = {}
    count = 0
    # Iterative walk with explicit depth: no Python recursion on attacker-shaped trees.
    stack = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ExprError(f"expression has more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise ExprError(f"expression nests more than {MAX_DEPTH} levels deep")
        _check_node(node, names, variables)
        for child in _children(node):
            stack.append((child, depth + 1))
    return Expr(text, tree, tuple(sorted(names, key=names.__getitem__)))


def _children(node: ast.AST):
    if isinstance(node, ast.BinOp):
        return (node.left, node.right)
    if isinstance(node, ast.UnaryOp):
        return (node.operand,)
    if isinstance(node, ast.BoolOp):
        return tuple(node.values)
    if isinstance(node, ast.Compare):
        return (node.left, *node.comparators)
    if isinstance(node, ast.IfExp):
        return (node.test, node.body, node.orelse)
    return ()


def _check_node(node: ast.AST, names: Dict[str, Tuple[int, int]],
                variables: Optional[Set[str]]) -> None:
    t = type(node)
    if t is ast.Constant:
        v = node.value
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int):
            if abs(v) > MAX_ABS_NUMBER:
                raise ExprError(f"number literal has {len(str(abs(v)))} digits; the limit is "
                                f"{MAX_ABS_NUMBER:.0e}")
            return
        if isinstance(v, float):
            if not math.isfinite(v) or abs(v) > MAX_ABS_NUMBER:
                raise ExprError(f"number literal {v!r} is out of range")
            return
        if isinstance(v, str):
            if len(v) > MAX_STR_CHARS:
                raise ExprError(f"string literal has {len(v)} characters; the limit is "
                                f"{MAX_STR_CHARS}")
            return
        raise ExprError(f"{type(v).__name__} literals are not allowed")
    if t is ast.Name:
        n = node.id
        if n.startswith("__") or n.startswith("_"):
            raise ExprError(f"name {n!r} is not allowed (underscore names are reserved)")
        if variables is not None and n not in variables:
            raise ExprError(f"unknown name {n!r}; expressions may only read program variables")
        pos = (node.lineno, node.col_offset)
        names[n] = min(names.get(n, pos), pos)
        return
    if t is ast.BinOp:
        if type(node.op) not in _BINOPS:
            raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        if type(node.op) is ast.Pow:
            e = node.right
            if isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.UAdd)):
                e = e.operand
            if isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) \
                    and not isinstance(e.value, bool) and abs(e.value) > MAX_EXPONENT:
                raise ExprError(f"exponent {e.value!r} exceeds the limit of {MAX_EXPONENT}")
        return
    if t is ast.UnaryOp:
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        return
    if t is ast.BoolOp or t is ast.IfExp:
        return
    if t is ast.Compare:
        for op in node.ops:
            if type(op) not in _CMPOPS:
                raise ExprError(f"comparison {type(op).__name__} is not allowed")
        return
    reason = _REJECTED.get(t)
    if reason is None:
        reason = f"{t.__name__} nodes are"
    raise ExprError(f"{reason} not allowed in expressions")


# ---------------------------------------------------------------------------------- static types
def _infer(node: ast.AST, types: Mapping[str, str]) -> str:
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return BOOL
        if isinstance(v, (int, float)):
            return NUMBER
        if isinstance(v, str):
            return TEXT
        return SCALAR
    if isinstance(node, ast.Name):
        return types.get(node.id, SCALAR)
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        # ``a or b`` returns an operand in Python; ours always returns a bool (see _Interp).
        return BOOL
    if isinstance(node, ast.UnaryOp):
        return NUMBER
    if isinstance(node, ast.BinOp):
        lt, rt = _infer(node.left, types), _infer(node.right, types)
        if isinstance(node.op, ast.Add) and lt == TEXT and rt == TEXT:
            return SCALAR  # numbers if both texts are numerals, else concatenated text
        if isinstance(node.op, ast.Mult) and TEXT in (lt, rt) and NUMBER in (lt, rt):
            return TEXT
        return NUMBER if (lt != TEXT or rt != TEXT) and SCALAR not in (lt, rt) else SCALAR
    if isinstance(node, ast.IfExp):
        a, b = _infer(node.body, types), _infer(node.orelse, types)
        return a if a == b else SCALAR
    return SCALAR


# ---------------------------------------------------------------------------------- evaluation
def as_number(v: Any) -> Optional[float]:
    """A number for ``v`` (int/float, numeral text, number word), else None. Bools are not
    numbers here."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        s = v.strip().lower().rstrip(".")
        if s in _WORD_VALUE:
            return _WORD_VALUE[s]
        if _NUMERAL.match(s):
            f = float(s)
            return int(f) if f.is_integer() and "." not in s else f
    return None


def truth(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str):
        s = v.strip().lower().rstrip(".")
        if s in ("yes", "true"):
            return True
        if s in ("no", "false", ""):
            return False
        raise ExprError(f"text {v[:40]!r} is not a truth value (expected yes/no/true/false)")
    raise ExprError(f"a {type(v).__name__} value is not a truth value")


def _check_value(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        if abs(v) > MAX_ABS_NUMBER:
            raise ExprError(f"intermediate number exceeds {MAX_ABS_NUMBER:.0e}")
        return v
    if isinstance(v, float):
        if not math.isfinite(v) or abs(v) > MAX_ABS_NUMBER:
            raise ExprError("intermediate number is out of range")
        return v
    if isinstance(v, str):
        if len(v) > MAX_STR_CHARS:
            raise ExprError(f"intermediate string exceeds {MAX_STR_CHARS} characters")
        return v
    raise ExprError(f"values of type {type(v).__name__} cannot be used in expressions")


class _Interp:
    def __init__(self, env: Mapping[str, Any]) -> None:
        self.env = env

    def run(self, node: ast.AST) -> Any:
        # Recursion depth is bounded by parse_expr's MAX_DEPTH (32), far below Python's limit.
        m = getattr(self, "_" + type(node).__name__, None)
        if m is None:  # unreachable for trees from parse_expr
            raise ExprError(f"{type(node).__name__} is not allowed")
        return m(node)

    def _Constant(self, node):
        return node.value

    def _Name(self, node):
        if node.id not in self.env:
            raise ExprError(f"variable {node.id!r} has no value")
        return _check_value(self.env[node.id])

    def _UnaryOp(self, node):
        v = self.run(node.operand)
        if isinstance(node.op, ast.Not):
            return not truth(v)
        n = as_number(v)
        if n is None:
            raise ExprError(f"unary minus/plus needs a number, got {_show(v)}")
        return _check_value(-n if isinstance(node.op, ast.USub) else +n)

    def _BoolOp(self, node):
        # Always a bool (Python returns an operand): the result type is static.
        if isinstance(node.op, ast.And):
            return all(truth(self.run(v)) for v in node.values)
        return any(truth(self.run(v)) for v in node.values)

    def _IfExp(self, node):
        return self.run(node.body) if truth(self.run(node.test)) else self.run(node.orelse)

    def _BinOp(self, node):
        sym, fn = _BINOPS[type(node.op)]
        a, b = self.run(node.left), self.run(node.right)
        if isinstance(a, str) and isinstance(b, str) and sym == "+" and (
                as_number(a) is None or as_number(b) is None):
            # Text + text concatenates unless both are numbers: VisProg pastes VQA answers into
            # '{A} + {B} == 6', so "3" + "3" must be 6, as it is there.
            if len(a) + len(b) > MAX_STR_CHARS:
                raise ExprError(f"string concatenation exceeds {MAX_STR_CHARS} characters")
            return a + b
        if sym == "*" and (isinstance(a, str) or isinstance(b, str)):
            s, k = (a, b) if isinstance(a, str) else (b, a)
            kn = as_number(k) if not isinstance(k, str) else None
            if isinstance(kn, int) and as_number(s) is None:
                if kn * len(s) > MAX_STR_CHARS:  # checked before allocating
                    raise ExprError(f"string repetition exceeds {MAX_STR_CHARS} characters")
                return s * max(kn, 0)
        x, y = as_number(a), as_number(b)
        if x is None or y is None:
            raise ExprError(f"operator {sym} needs numbers, got {_show(a)} and {_show(b)}")
        if sym in ("/", "//", "%") and y == 0:
            raise ExprError(f"division by zero in {sym}")
        if sym == "**":
            return _check_value(_safe_pow(x, y))
        try:
            return _check_value(fn(x, y))
        except (OverflowError, ArithmeticError) as e:
            raise ExprError(f"arithmetic error in {sym}: {e}") from None

    def _Compare(self, node):
        left = self.run(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = self.run(comp)
            sym, fn = _CMPOPS[type(op)]
            if sym in ("in", "not in"):
                if not (isinstance(left, str) and isinstance(right, str)):
                    raise ExprError(f"'{sym}' needs text on both sides")
                ok = fn(left.lower(), right.lower())
            else:
                x, y = as_number(left), as_number(right)
                if x is not None and y is not None:
                    ok = fn(x, y)
                elif isinstance(left, str) and isinstance(right, str):
                    a, b = left.strip().lower(), right.strip().lower()
                    ok = fn(a, b)
                elif sym in ("==", "!="):
                    ok = fn(_norm(left), _norm(right))
                else:
                    raise ExprError(f"cannot order {_show(left)} and {_show(right)}")
            if not ok:
                return False
            left = right
        return True


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip().lower().rstrip(".")
        if s in ("yes", "true"):
            return True
        if s in ("no", "false"):
            return False
    return v


def _safe_pow(x, y):
    if isinstance(y, float) and not y.is_integer():
        if x < 0:
            raise ExprError("fractional power of a negative number")
    if abs(y) > MAX_EXPONENT:
        raise ExprError(f"exponent {y!r} exceeds the limit of {MAX_EXPONENT}")
    if x == 0 and y < 0:
        raise ExprError("zero to a negative power")
    if abs(x) > 1 and y > 0 and y * math.log10(abs(x)) > math.log10(MAX_ABS_NUMBER):
        raise ExprError(f"{x!r} ** {y!r} exceeds {MAX_ABS_NUMBER:.0e}")
    if isinstance(y, float) and y.is_integer():
        y = int(y)
    try:
        return x ** y
    except (OverflowError, ArithmeticError) as e:
        raise ExprError(f"arithmetic error in **: {e}") from None


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f"text {v[:40]!r}"
    return f"{type(v).__name__} {v!r}"


def is_identifier(name: str) -> bool:
    return bool(_IDENT.match(name)) and not name.startswith("_")


__all__ = ["Expr", "ExprError", "parse_expr", "as_number", "truth", "MAX_EXPR_CHARS",
           "MAX_DEPTH", "MAX_NODES", "MAX_ABS_NUMBER", "MAX_EXPONENT", "MAX_STR_CHARS"]
