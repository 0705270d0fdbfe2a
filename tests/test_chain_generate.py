"""Program generation: ShapesWorld instruction -> program data, the in-context prompt, answer
parsing, validation with retries (fake clients), and the bundled program LM."""
from __future__ import annotations

import pytest

from fmrt.chain import generate as G
from fmrt.chain.cupl import CallableSource, Sampling
from fmrt.chain.program import MODULES, parse_program
from fmrt.data import program_data as D
from fmrt.pretrained import list_pretrained

TWO = {"LEFT": "Image", "RIGHT": "Image"}
GOOD = """OBJ0=Loc(image=LEFT, object='circle')
N0=Count(object=OBJ0)
OBJ1=Loc(image=RIGHT, object='circle')
N1=Count(object=OBJ1)
ANSWER0=Eval(expr='{N0} + {N1} == 3')
RESULT=ANSWER0"""
BAD_TYPE = GOOD.replace("N1=Count(object=OBJ1)", "N1=Count(object=N0)")
bundled = pytest.mark.skipif("shapes-programs" not in list_pretrained(),
                             reason="shapes-programs is not bundled")


# ------------------------------------------------------------------------------- data
def test_program_data_validates_and_splits():
    for split in ("train", "test"):
        items = D.instruction_set(split, 180, seed=3)
        assert {x.kind for x in items} == set(D.KINDS)
        for x in items:
            prog = parse_program(x.program, x.inputs)
            assert x.frame.test_only == (split == "test"), x.text
            if x.kind in D.NLVR_KINDS:
                assert set(prog.inputs) == {"LEFT", "RIGHT"} and str(prog.result_type) == "Bool"
    train = {x.text for x in D.instruction_set("train", 2000)}
    test = D.instruction_set("test", 300)
    assert not train & {x.text for x in test}  # held-out combinations never occur in training
    held_pair = [x for x in test if any(p.held_out for p in x.frame.phrases)]
    held_tmpl = [x for x in test if D.TEMPLATES[x.kind][x.frame.template][1]]
    assert len(held_pair) > 60 and len(held_tmpl) > 60


def test_example_from_the_issue_and_deterministic():
    f = D.Frame("total", 0, (D.ObjPhrase(None, None), D.ObjPhrase(None, "circle")), (6, 2))
    assert D.instruction_text(f) == ("the left and right image contain a total of six shapes "
                                     "and two circles")
    p = D.program_text(f)
    assert "ANSWER0=Eval(expr='{N0} + {N1} == 6 and {N2} + {N3} == 2')" in p
    assert p.count("Loc(image=LEFT") == 2 and p.count("Loc(image=RIGHT") == 2
    a, b = D.sample_task("test", 5), D.sample_task("test", 5)
    assert a.instruction == b.instruction and (a.images["LEFT"] == b.images["LEFT"]).all()


def test_tokenizer_roundtrip():
    tok = D.ProgramTokenizer.build()
    assert tok == D.ProgramTokenizer.from_dict(tok.to_dict())
    for x in D.instruction_set("test", 90):
        ids, labels = tok.encode_pair(x.text, x.delex_program)
        body = ids[ids.index(tok.prog_id) + 1:]
        assert tok.decode_program(body, x.text) == x.program and tok.unk_id not in ids
        assert labels[:ids.index(tok.prog_id) + 1] == [tok.IGNORE] * (ids.index(tok.prog_id) + 1)
    assert tok.unknown("segment the zebras") == ["zebras"]
    # slots: values leave the model's input (indexed by phrase); decoding puts them back
    words, slots = D.delexicalize(D.instruction_tokens("the 2 images show six blue triangles "
                                                       "and 2 blue shapes"))
    assert words == ["the", "2", "images", "show", "<num0>", "<color0>", "<shape0>", "and",
                     "<num1>", "<color1>", "shapes"]
    assert slots == {"<num0>": "6", "<color0>": "blue", "<shape0>": "triangle", "<num1>": "2",
                     "<color1>": "blue"}
    assert D.delexicalize(["exactly", "one", "image", "contains", "a", "star"])[0] == [
        "exactly", "one", "image", "contains", "a", "<shape0>"]
    ids = [tok.stoi[a] for a in ["'", "<color1>", " ", "<shape1>", "'", " ", "==", " ", "<num0>"]]
    assert tok.decode_program(ids, "six blue stars") == "'<color1> <shape1>' == 6"
    assert tok.decode_program(ids, "two blue stars and six red triangles") == \
        "'red triangle' == 2"
    x = D.instruction_set("train", 1)[0]
    assert "<num0>" in x.delex_program or "<shape0>" in x.delex_program or \
        "<color0>" in x.delex_program
    with pytest.raises(ValueError):
        D.ProgramTokenizer.from_dict({"kind": "word"})


# ------------------------------------------------------------------------------- prompt
def test_prompt_has_modules_examples_and_instruction():
    ex = G.shapes_examples()
    assert len(ex) == 2 * len(D.KINDS)
    gen = G.ProgramGenerator(lambda p: GOOD, ex, k=4)
    prompt = gen.prompt_for("the left image contains more stars than the right image", TWO)
    for name in MODULES.names():
        assert f"  {name}(" in prompt
    assert "open-vocabulary localisation" in prompt  # module descriptions, as VisProg's prompt
    assert prompt.count("Instruction:") == 5 and prompt.rstrip().endswith("Program:")
    assert prompt.rstrip().splitlines()[-2] == ("Instruction: the left image contains more "
                                                "stars than the right image")
    shown = G.select_examples("the left image contains more stars than the right image", ex, 4,
                              TWO)
    assert all(set(e.inputs) == set(TWO) for e in shown)
    assert shown[0].program in prompt and any(e.instruction.find("than") > 0 for e in shown)
    assert G.last_instruction(prompt).startswith("the left image contains more stars")


def test_extract_program_and_infer_inputs():
    chatty = "Sure! Here is the program:\n```python\n" + GOOD + "\n```\nIt counts circles."
    assert G.extract_program(chatty) == GOOD
    assert G.extract_program("Program: " + GOOD + "\n\nInstruction: next one") == GOOD
    assert G.extract_program(GOOD + "\nOBJ9=Loc(image=LEFT, object='x')") == GOOD
    assert G.extract_program("I cannot help with that.") == ""
    assert G.infer_inputs(GOOD) == TWO
    assert G.infer_inputs("N=Count(object=OBJ)\nRESULT=N") == {"IMAGE": "Image"}


# ------------------------------------------------------------------------------- retries
def test_retry_shows_the_validation_error_then_succeeds():
    prompts = []
    answers = iter([BAD_TYPE, GOOD])

    def client(prompt):
        prompts.append(prompt)
        return next(answers)

    out = G.ProgramGenerator(client, max_attempts=3).generate("in total there are three "
                                                              "circles", TWO)
    assert out.text == GOOD and len(out.attempts) == 2
    assert "expects ObjectList" in out.attempts[0].error and out.attempts[1].error is None
    assert "That program is invalid: line 4:" in prompts[1] and BAD_TYPE in prompts[1]
    assert out.program.result == "ANSWER0" and out.inputs == TWO


def test_retry_exhausted_raises_typed_error_with_attempts():
    calls = []
    src = CallableSource(lambda p, s: calls.append(s) or ["RESULT=__import__('os')"], "evil")
    gen = G.ProgramGenerator(src, max_attempts=2)
    with pytest.raises(G.ProgramGenerationError) as ei:
        gen.generate("count the stars")
    e = ei.value
    assert isinstance(e, ValueError) and len(e.attempts) == 2 and len(calls) == 2
    assert "unknown module" in e.attempts[0].error and "no valid program" in str(e)
    assert calls[0].temperature == 0.0 and calls[1].temperature == 0.7  # retries sample
    assert e.to_dict()["attempts"][1]["error"]
    with pytest.raises(G.ProgramGenerationError, match="no program line"):
        G.ProgramGenerator(lambda p: "no idea", max_attempts=1).generate("count the stars")
    with pytest.raises(ValueError):
        gen.generate("   ")
    with pytest.raises(ValueError):
        gen.generate("x" * 1000)
    with pytest.raises(ValueError):
        G.ProgramGenerator(None)


def test_wrong_inputs_are_a_validation_error():
    # the program reads LEFT/RIGHT but the caller has only IMAGE: rejected, never run
    gen = G.ProgramGenerator(lambda p: GOOD, max_attempts=1)
    with pytest.raises(G.ProgramGenerationError, match="undefined variable 'LEFT'"):
        gen.generate("count the circles", {"IMAGE": "Image"})


# ------------------------------------------------------------------------------- over HTTP
def test_in_context_generation_through_an_openai_compatible_endpoint():
    """The in-context generator behind ``OpenAIChatSource``: a local stub that speaks the
    OpenAI chat protocol (as a hosted LLM would; no real endpoint is reachable here) answers
    chattily with a fenced program, first an invalid one, then a valid one; the generator sends
    the in-context prompt as a user message, retries with the validation error at the retry
    temperature, and returns the validated program."""
    from fmrt.chain.cupl import OpenAIChatSource
    from tests.helpers import json_stub_server

    seen = []
    answers = [BAD_TYPE, GOOD]

    def respond(path, body, headers):
        seen.append((path, body, headers.get("Authorization")))
        text = "Here you go:\n```\n" + answers[min(len(seen) - 1, 1)] + "\n```"
        return 200, {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": text}}]}

    with json_stub_server(respond) as url:
        src = OpenAIChatSource(url + "/v1", "stub-llm", api_key="sk-test")
        out = G.ProgramGenerator(src, max_attempts=3).generate(
            "in total there are three circles", TWO)
    assert out.text == GOOD and len(out.attempts) == 2 and out.attempts[1].error is None
    assert [p for p, _, _ in seen] == ["/v1/chat/completions"] * 2
    first, second = seen[0][1], seen[1][1]
    assert first["model"] == "stub-llm" and seen[0][2] == "Bearer sk-test"
    assert first["messages"][-1]["role"] == "user"
    assert "in total there are three circles" in first["messages"][-1]["content"]
    assert "RESULT=" in first["messages"][-1]["content"]          # in-context examples
    assert first["temperature"] == 0.0 and second["temperature"] == 0.7
    assert "That program is invalid" in second["messages"][-1]["content"]


# ------------------------------------------------------------------------------- bundled LM
@bundled
def test_bundled_generator_writes_valid_programs_for_held_out_instructions():
    gen = G.LocalProgramGenerator("shapes-programs")
    items = D.instruction_set("test", 27, seed=11)
    res = gen.generate_many([x.text for x in items], [x.inputs for x in items])
    assert all(isinstance(r, G.GeneratedProgram) for r in res), [
        r for r in res if not isinstance(r, G.GeneratedProgram)]
    exact = sum(r.text == x.program for r, x in zip(res, items))
    assert exact >= 24, exact
    att, prog = gen._check("OBJ0=Loc(image=IMAGE, object='<color1> star')\nRESULT=OBJ0",
                           {"IMAGE": "Image"}, 0.0)
    assert prog is None and "slot <color1>" in att.error  # unfilled slot: retried, never run
    one = gen.generate("how many blue triangles are in the image", {"IMAGE": "Image"})
    assert "object='blue triangle'" in one.text and one.program.result == "N0"
    # the same model as a cupl text source behind the in-context generator
    via = G.ProgramGenerator(gen.as_text_source(), k=2).generate(
        "tag the red shapes", {"IMAGE": "Image"})
    assert "Tag(image=IMAGE, object=OBJ0)" in via.text
    assert gen.as_text_source().generate("Instruction: segment the stars\nProgram:",
                                         Sampling(n=2, temperature=0.0))[0].startswith("OBJ0=")


@bundled
def test_bundled_generator_is_small_and_documented():
    import os

    from fmrt.pretrained import read_config, resolve

    d = resolve("shapes-programs")
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    assert size < 5 * 1024 * 1024
    prov = read_config("shapes-programs")["provenance"]
    assert prov["test"]["validity"] >= 0.95 and "command" in prov
