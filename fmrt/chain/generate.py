"""Program generation: instruction -> validated visual program.

Two generators with one interface, ``generate(instruction, inputs=None) -> GeneratedProgram``:

* ``ProgramGenerator(client, examples=...)``: VisProg's recipe. An in-context prompt (the
  module signatures with one-line descriptions, then ``Instruction: ... / Program: ...``
  examples, then the new instruction) goes to any text-generation client of
  ``fmrt.chain.cupl`` (``OpenAIChatSource``, ``ServedLMSource``, ``CallableSource``, a
  ``ProgramLMSource`` below) or a plain ``prompt -> str`` callable. The examples shown are the
  ``k`` most similar to the instruction (word overlap) among those whose inputs match
  (VisProg uses a fixed set per task; similarity picks the right task's examples when one prompt
  serves all tasks).
* ``LocalProgramGenerator("shapes-programs")``: the bundled tiny LLaMA trained on ShapesWorld
  instruction -> program pairs (``fmrt train programs``); the prompt is the instruction alone.
  Offline, ~10 ms a program at batch 64 on one core.

Every answer is cut to the program (code fences, a ``Program:`` label and trailing chatter are
dropped) and validated with ``fmrt.chain.program.parse_program`` before anything runs. An
invalid answer is retried up to ``max_attempts`` in all: the client is shown its previous
answer with the validation error ("line 3: Count argument 'object' expects ObjectList, but 'N0'
is a Number"), the local model samples (temperature 0.7) instead of decoding greedily. When
every attempt fails, ``ProgramGenerationError`` (a ``ValueError``) carries each attempt's text
and error. Generated text is never evaluated as Python: it only ever reaches the parser.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from fmrt.chain.program import MODULES, ModuleRegistry, Program, ProgramError, parse_program

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_K = 8
MAX_INSTRUCTION_CHARS = 500
#: Input names inferred as images when ``inputs`` is not given (the program LM's conventions).
IMAGE_INPUT = re.compile(r"^(IMAGE\d*|LEFT|RIGHT)$")

PREAMBLE = ("Write a visual program for the instruction. One step a line: "
            "NAME=Module(arg=value, ...). Values are 'strings', numbers or earlier names. "
            "Eval takes an expression over earlier names written {NAME}. The last line is "
            "RESULT=NAME.")


class ProgramGenerationError(ValueError):
    """No valid program after every attempt; ``attempts`` lists ``Attempt``s (text, error)."""

    def __init__(self, instruction: str, attempts: List["Attempt"], reason: str = "") -> None:
        self.instruction, self.attempts = instruction, list(attempts)
        last = attempts[-1].error if attempts else None
        msg = reason or (f"no valid program for {instruction[:80]!r} after {len(attempts)} "
                         f"attempt(s); last error: {last}")
        super().__init__(msg)

    def __reduce__(self):
        return (ProgramGenerationError, (self.instruction, self.attempts, str(self)))

    def to_dict(self) -> Dict[str, Any]:
        return {"instruction": self.instruction, "message": str(self),
                "attempts": [a.to_dict() for a in self.attempts]}


@dataclass
class Attempt:
    text: str
    error: Optional[str] = None  # "line N: reason" of the validation error, None = valid
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"text": self.text, "error": self.error, "seconds": round(self.seconds, 4)}


@dataclass
class GeneratedProgram:
    instruction: str
    text: str
    program: Program
    inputs: Dict[str, str]
    attempts: List[Attempt] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"instruction": self.instruction, "program": self.text, "inputs": self.inputs,
                "source": self.source, "attempts": [a.to_dict() for a in self.attempts]}


@dataclass(frozen=True)
class Example:
    """An in-context example: instruction, program, input names -> types."""

    instruction: str
    program: str
    inputs: Mapping[str, str]


# ---------------------------------------------------------------------------------- parsing
_ASSIGN_LINE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=(?!=)")
_RESULT_LINE = re.compile(r"^\s*RESULT\s*=(?!=)")


def extract_program(response: str) -> str:
    """The program in a model answer: inside the first code fence when there is one; from the
    first ``NAME=`` line through the first ``RESULT=`` line (a blank line or a new
    ``Instruction:`` after some steps also ends it). Returns "" when there is no step line."""
    if not isinstance(response, str):
        return ""
    text = response.replace("\r\n", "\n")
    fence = re.search(r"```[A-Za-z0-9_+-]*\n(.*?)(```|$)", text, re.S)
    if fence:
        text = fence.group(1)
    out: List[str] = []
    for line in text.split("\n"):
        s = line.strip()
        if not out:
            if s.lower().startswith("program:"):
                s = s[len("program:"):].strip()
            if not _ASSIGN_LINE.match(s):
                continue
        elif not s or s.lower().startswith(("instruction:", "program:")):
            break
        out.append(s)
        if _RESULT_LINE.match(s):
            break
    return "\n".join(out)


def infer_inputs(text: str) -> Dict[str, str]:
    """Image inputs a program reads without defining (``IMAGE``, ``IMAGE1``, ``LEFT``,
    ``RIGHT``); ``{"IMAGE": "Image"}`` when it names none."""
    defined = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)", text, re.M))
    used = set(re.findall(r"\b([A-Z][A-Z0-9_]*)\b", text))
    names = sorted(n for n in used - defined if IMAGE_INPUT.match(n))
    return {n: "Image" for n in names} or {"IMAGE": "Image"}


def validate(text: str, inputs: Optional[Mapping[str, str]] = None, *,
             modules: ModuleRegistry = MODULES) -> Program:
    """``parse_program`` with ``inputs`` (inferred image inputs when None)."""
    return parse_program(text, dict(inputs) if inputs is not None else infer_inputs(text),
                         modules=modules)


def _check_instruction(instruction: Any) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction has {len(instruction)} characters; the limit is "
                         f"{MAX_INSTRUCTION_CHARS}")
    return " ".join(instruction.split())


# ---------------------------------------------------------------------------------- prompt
def shapes_examples(per_kind: int = 2, seed: int = 0) -> List[Example]:
    """In-context examples from the *train* split of ``fmrt.data.program_data`` (``per_kind``
    of each of its nine kinds)."""
    from fmrt.data import program_data as D

    items = D.instruction_set("train", per_kind * len(D.KINDS), seed=seed + 7)
    return [Example(x.text, x.program, dict(x.inputs)) for x in items]


def _words(s: str) -> set:
    return set(re.findall(r"[a-z]+", s.lower()))


def select_examples(instruction: str, pool: Sequence[Example], k: int,
                    inputs: Optional[Mapping[str, str]] = None) -> List[Example]:
    """The ``k`` examples most similar to ``instruction`` (Jaccard word overlap; ties keep
    pool order), restricted to examples with the same input names when any exist."""
    cands = list(pool)
    if inputs is not None:
        same = [e for e in cands if set(e.inputs) == set(inputs)]
        cands = same or cands
    w = _words(instruction)
    scored = sorted(enumerate(cands), key=lambda ie: (
        -len(w & _words(ie[1].instruction)) / max(1, len(w | _words(ie[1].instruction))),
        ie[0]))
    return [e for _, e in scored[:k]]


def build_prompt(instruction: str, examples: Sequence[Example], *,
                 inputs: Optional[Mapping[str, str]] = None,
                 modules: ModuleRegistry = MODULES) -> str:
    """The in-context prompt: preamble, module signatures with descriptions, the examples,
    then ``Instruction: <instruction>`` and an open ``Program:``."""
    lines = [PREAMBLE, "", "Modules:"]
    for name in modules.names():
        spec = modules.get(name)
        lines.append(f"  {spec.describe()}  # {spec.doc}" if spec.doc else f"  {spec.describe()}")
    lines.append("")
    for e in examples:
        lines += [f"Inputs: {', '.join(e.inputs)}", f"Instruction: {e.instruction}", "Program:",
                  e.program.strip(), ""]
    if inputs:
        lines.append(f"Inputs: {', '.join(inputs)}")
    lines += [f"Instruction: {instruction}", "Program:"]
    return "\n".join(lines)


def last_instruction(prompt: str) -> str:
    """The instruction of an in-context prompt (its last ``Instruction:`` line), or the whole
    prompt when it has none."""
    found = re.findall(r"^Instruction:\s*(.*)$", prompt, re.M)
    return found[-1].strip() if found else prompt.strip()


# ---------------------------------------------------------------------------------- generators
class _Generator:
    source = "base"

    def __init__(self, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 modules: ModuleRegistry = MODULES) -> None:
        if int(max_attempts) < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = int(max_attempts)
        self.modules = modules

    def _propose(self, instruction: str, inputs: Optional[Mapping[str, str]], i: int,
                 history: List[Attempt]) -> str:
        raise NotImplementedError

    def _check(self, raw: str, inputs, seconds: float) -> "tuple[Attempt, Optional[Program]]":
        text = extract_program(raw)
        if not text:
            return Attempt(raw[:2000] if isinstance(raw, str) else "",
                           "the answer contains no program line (NAME=Module(...))",
                           seconds), None
        try:
            return Attempt(text, None, seconds), validate(text, inputs, modules=self.modules)
        except ProgramError as e:
            return Attempt(text, str(e), seconds), None

    def generate(self, instruction: str, inputs: Optional[Mapping[str, str]] = None
                 ) -> GeneratedProgram:
        """A validated program for ``instruction``. ``inputs``: the program's named inputs and
        their types (e.g. ``{"LEFT": "Image", "RIGHT": "Image"}``); None = infer image inputs
        from the program. Raises ``ProgramGenerationError`` after ``max_attempts`` invalid
        answers, ``ValueError`` for an empty/over-long instruction."""
        instruction = _check_instruction(instruction)
        history: List[Attempt] = []
        for i in range(self.max_attempts):
            t0 = time.perf_counter()
            raw = self._propose(instruction, inputs, i, history)
            att, prog = self._check(raw, inputs, time.perf_counter() - t0)
            history.append(att)
            if prog is not None:
                return GeneratedProgram(instruction, att.text, prog,
                                        {k: str(v) for k, v in prog.inputs.items()}, history,
                                        self.source)
        raise ProgramGenerationError(instruction, history)


class ProgramGenerator(_Generator):
    """In-context program generation with any text-generation client.

    ``client``: a ``fmrt.chain.cupl.TextSource`` (``generate(prompt, Sampling) -> [str]``) or a
    callable ``prompt -> str``. ``examples``: the in-context pool (default
    ``shapes_examples()``); ``k`` of them are shown per instruction. ``temperature``: of the
    first attempt (retries use ``retry_temperature``)."""

    source = "in-context"

    def __init__(self, client: Any, examples: Optional[Sequence[Example]] = None, *,
                 k: int = DEFAULT_K, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 temperature: float = 0.0, retry_temperature: float = 0.7,
                 max_tokens: int = 512, modules: ModuleRegistry = MODULES) -> None:
        super().__init__(max_attempts=max_attempts, modules=modules)
        if isinstance(client, LocalProgramGenerator):  # the program LM as a text source
            client = client.as_text_source()
        if client is None or not (callable(client) or hasattr(client, "generate")):
            raise ValueError("client must be a cupl TextSource or a prompt -> str callable")
        self.client = client
        self.examples = list(examples) if examples is not None else shapes_examples()
        for e in self.examples:
            if not isinstance(e, Example):
                raise ValueError(f"examples must be Example records, got {type(e).__name__}")
        self.k, self.temperature = int(k), float(temperature)
        self.retry_temperature, self.max_tokens = float(retry_temperature), int(max_tokens)

    def prompt_for(self, instruction: str, inputs: Optional[Mapping[str, str]] = None) -> str:
        ex = select_examples(instruction, self.examples, self.k, inputs)
        return build_prompt(instruction, ex, inputs=inputs, modules=self.modules)

    def _call(self, prompt: str, temperature: float, seed: int) -> str:
        from fmrt.chain.cupl import Sampling, TextGenerationError

        if hasattr(self.client, "generate"):
            out = self.client.generate(prompt, Sampling(n=1, temperature=temperature,
                                                        max_tokens=self.max_tokens, seed=seed))
            if not out:
                raise TextGenerationError("the client returned no completion")
            return str(out[0])
        out = self.client(prompt)
        if not isinstance(out, str):
            raise TextGenerationError(f"the client returned {type(out).__name__}, not text")
        return out

    def _propose(self, instruction, inputs, i, history) -> str:
        prompt = self.prompt_for(instruction, inputs)
        if history:  # show the last invalid answer and why (VisProg has no such loop)
            last = history[-1]
            prompt += ("\n" + last.text + "\n\nThat program is invalid: " + str(last.error) +
                       "\nWrite the corrected program.\nInstruction: " + instruction +
                       "\nProgram:")
        return self._call(prompt, self.temperature if i == 0 else self.retry_temperature, i)


class LocalProgramGenerator(_Generator):
    """The bundled program LM (``shapes-programs`` or a model directory from ``fmrt train
    programs``): greedy first, then sampled retries."""

    source = "fmrt-program-lm"

    def __init__(self, model: str = "shapes-programs", *,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry_temperature: float = 0.7,
                 batch_size: int = 64, modules: ModuleRegistry = MODULES) -> None:
        super().__init__(max_attempts=max_attempts, modules=modules)
        from fmrt.data.program_data import ProgramTokenizer
        from fmrt.pretrained import PretrainedError, load_pretrained

        p = load_pretrained(model)
        if "program_tokenizer" not in p.config:
            raise PretrainedError(f"{model} is not a program LM (no program_tokenizer in its "
                                  "config)")
        self.name, self.model = p.name, p.model.eval()
        self.tokenizer = ProgramTokenizer.from_dict(p.config["program_tokenizer"])
        self.provenance = p.config.get("provenance", {})
        self.retry_temperature, self.batch_size = float(retry_temperature), int(batch_size)

    def _check(self, raw: str, inputs, seconds: float):
        left = re.findall(r"<(?:color|shape|num)\d>", raw or "")
        if left:  # a slot the instruction does not fill: retry rather than run '<color1>'
            return Attempt(raw, f"the program uses slot {left[0]}, which the instruction does "
                           "not fill", seconds), None
        return super()._check(raw, inputs, seconds)

    def _raw(self, instructions: Sequence[str], temperature: float = 0.0,
             seed: Optional[int] = None) -> List[str]:
        from fmrt.train.programs import generate_programs

        return generate_programs(self.model, self.tokenizer, list(instructions),
                                 batch_size=self.batch_size, temperature=temperature, seed=seed)

    def _propose(self, instruction, inputs, i, history) -> str:
        return self._raw([instruction], 0.0 if i == 0 else self.retry_temperature, seed=i)[0]

    def generate_many(self, instructions: Sequence[str],
                      inputs: Optional[Sequence[Optional[Mapping[str, str]]]] = None
                      ) -> List[Union[GeneratedProgram, ProgramGenerationError]]:
        """``generate`` for many instructions: one batched greedy pass, then per-instruction
        sampled retries for the invalid ones. Failures are returned (not raised) in place."""
        instrs = [_check_instruction(s) for s in instructions]
        inputs = list(inputs) if inputs is not None else [None] * len(instrs)
        t0 = time.perf_counter()
        raws = self._raw(instrs)
        per = (time.perf_counter() - t0) / max(1, len(instrs))
        out: List[Union[GeneratedProgram, ProgramGenerationError]] = []
        for s, inp, raw in zip(instrs, inputs, raws):
            history: List[Attempt] = []
            att, prog = self._check(raw, inp, per)
            history.append(att)
            i = 1
            while prog is None and i < self.max_attempts:
                t1 = time.perf_counter()
                att, prog = self._check(self._propose(s, inp, i, history), inp,
                                        time.perf_counter() - t1)
                history.append(att)
                i += 1
            out.append(GeneratedProgram(s, att.text, prog, {k: str(v) for k, v in
                                                            prog.inputs.items()},
                                        history, self.source) if prog is not None
                       else ProgramGenerationError(s, history))
        return out

    def as_text_source(self) -> "ProgramLMSource":
        return ProgramLMSource(self)


def _text_source_base():
    from fmrt.chain.cupl import TextSource

    return TextSource


class ProgramLMSource(_text_source_base()):
    """The program LM as a ``fmrt.chain.cupl`` text source: ``generate(prompt, sampling)``
    answers the prompt's last ``Instruction:`` (so ``ProgramGenerator(ProgramLMSource(...))``
    runs the in-context path offline)."""

    kind = "fmrt-program-lm"

    def __init__(self, generator: Union[str, LocalProgramGenerator] = "shapes-programs") -> None:
        self.gen = (generator if isinstance(generator, LocalProgramGenerator)
                    else LocalProgramGenerator(generator))

    def provenance(self) -> Dict[str, Any]:
        return {"source": self.kind, "model": self.gen.name}

    def generate(self, prompt: str, sampling) -> List[str]:
        instr = last_instruction(prompt)
        t = float(getattr(sampling, "temperature", 0.0) or 0.0)
        n = max(1, int(getattr(sampling, "n", 1)))
        seed = getattr(sampling, "seed", None)
        return self.gen._raw([instr] * n, t, seed=seed)


__all__ = ["ProgramGenerator", "LocalProgramGenerator", "ProgramLMSource", "GeneratedProgram",
           "ProgramGenerationError", "Attempt", "Example", "build_prompt", "select_examples",
           "extract_program", "infer_inputs", "validate", "shapes_examples", "last_instruction",
           "PREAMBLE"]
