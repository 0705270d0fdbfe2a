"""SAM training on ShapesWorld: prompt sampling, correction clicks, losses against hand-computed
values, best-of-3 selection, a few-step smoke run with exact resume, and the bundled shapes-sam."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fmrt
from fmrt.data.sam_data import (PROMPT_BOX, PROMPT_POINT, SamPromptConfig, SamPromptStream,
                                eval_scenes, jitter_box)
from fmrt.data.scene import FastRNG
from fmrt.train import sam as T


@pytest.fixture(autouse=True)
def _one_thread():
    # On a loaded 2-core host two intra-op threads spin against each other (a 0.1 s step can take
    # seconds); one thread keeps the smoke runs fast. Restored after each test.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ data


def test_stream_deterministic_and_consistent():
    s = SamPromptStream(SamPromptConfig(), batch_size=6, seed=3)
    a, b = s(5), SamPromptStream(SamPromptConfig(), batch_size=6, seed=3)(5)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(s(6)["images"], a["images"])
    P = len(a["kinds"])
    assert a["images"].shape == (6, 64, 64, 3) and a["masks"].shape == (P, 64, 64)
    assert set(a["kinds"].tolist()) <= {PROMPT_POINT, PROMPT_BOX}
    for i in range(P):
        m = a["masks"][i]
        assert m.any()
        if a["kinds"][i] == PROMPT_POINT:  # every point prompt lies on its object
            x, y = a["points"][i]
            assert m[int(round(y)), int(round(x))]
        else:  # the jittered box stays near the mask's tight box
            ys, xs = np.nonzero(m)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert np.abs(a["boxes"][i] - tight).max() <= 6
        # the object is in the prompt's image
        img = a["images"][a["image_index"][i]]
        assert (img[m] != img[~m].mean(0).round()).any()


def test_max_prompts_per_image():
    s = SamPromptStream(SamPromptConfig(max_prompts_per_image=1), batch_size=8, seed=0)
    assert np.array_equal(np.bincount(s(0)["image_index"], minlength=8), np.ones(8))


def test_jitter_box_stays_valid():
    R = FastRNG(np.random.default_rng(0))
    for _ in range(200):
        b = jitter_box((0, 60, 5, 64), R, 64, noise=0.5)
        assert 0 <= b[0] < b[2] <= 64 + 1 and 0 <= b[1] < b[3] <= 64 + 1


def test_eval_scenes_are_the_test_split():
    from fmrt.data import ShapesWorldDataset

    ds = ShapesWorldDataset("test", 3)
    for sc, i in zip(eval_scenes(3), range(3)):
        assert np.array_equal(sc.masks(), ds[i]["masks"])


# ------------------------------------------------------------------------------------ losses


def test_focal_and_dice_hand_computed():
    # 1 x 2 "mask": logits (0, 2), target (1, 0)
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float64)[None]  # 1 x 1 x 2
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)[None]
    p1, p2 = 0.5, 1 / (1 + math.exp(-2))
    # pixel 1 positive: 0.25 * (1 - 0.5)^2 * -log 0.5; pixel 2 negative: 0.75 * p2^2 * -log(1 - p2)
    f1 = 0.25 * 0.25 * math.log(2)
    f2 = 0.75 * p2 ** 2 * -math.log(1 - p2)
    assert T.sigmoid_focal_loss(logits, target).item() == pytest.approx((f1 + f2) / 2, rel=1e-12)
    d = 1 - (2 * p1 + 1) / (p1 + p2 + 1 + 1)
    assert T.dice_loss(logits, target).item() == pytest.approx(d, rel=1e-12)
    # perfect confident prediction: both near 0
    big = torch.tensor([[[30.0, -30.0]]], dtype=torch.float64)
    assert T.sigmoid_focal_loss(big, target).item() < 1e-20
    assert T.dice_loss(big, target).item() < 1e-12


def test_mask_iou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    assert T.mask_iou(a, b).tolist() == pytest.approx([4 / 12, 1.0])  # empty vs empty -> 1


def test_sam_loss_takes_best_of_three_and_iou_mse_on_all():
    torch.manual_seed(0)
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6] = True
    target[1, :4] = True
    sign = target.float() * 2 - 1
    logits = torch.stack([torch.randn(2, 8, 8), 6 * sign, -6 * sign], dim=1)  # good mask = 1
    logits = torch.stack([logits[0], logits[1][[1, 2, 0]]])  # prompt 1: good mask at index 0
    iou_pred = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.3, 0.0]], requires_grad=True)
    loss, parts, best = T.sam_loss(logits.requires_grad_(), iou_pred, target)
    assert best.tolist() == [1, 0]
    per = 20 * T.sigmoid_focal_loss(logits, target[:, None].expand_as(logits)) + \
        T.dice_loss(logits, target[:, None].expand_as(logits))
    actual = T.mask_iou(logits > 0, target[:, None].expand_as(logits))
    expect = per[[0, 1], [1, 0]].mean() + ((iou_pred - actual) ** 2).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert actual[0, 1] == 1 and actual[1, 0] == 1 and actual[0, 2] == 0
    loss.backward()
    # only the best mask of each prompt gets a mask-loss gradient
    g = logits.grad
    assert g[0, 1].abs().sum() > 0 and g[0, 0].abs().sum() == 0 and g[1, 1].abs().sum() == 0
    assert (iou_pred.grad != 0).all()  # IoU MSE on all three masks


def test_correction_points_come_from_the_error_region():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(3, 16, 16, dtype=torch.bool)
    target[:, 4:12, 4:12] = True
    pred = target.clone()
    pred[0, 4:12, 4:8] = False          # false negatives only -> positive click inside them
    pred[1, 0:2, :] = True              # false positives only -> negative click there
    for _ in range(20):
        c, lab = T.sample_correction_points(pred, target, g)
        x, y = c[0].long().tolist()
        assert lab[0] == 1 and 4 <= x < 8 and 4 <= y < 12
        x, y = c[1].long().tolist()
        assert lab[1] == 0 and y < 2
        x, y = c[2].long().tolist()        # no error: a positive point on the object
        assert lab[2] == 1 and target[2, y, x]


# ------------------------------------------------------------------------------------ training


def _tiny_cfg(tmp_path, **kw):
    return T.SamTrainConfig(out_dir=str(tmp_path / "run"), steps=kw.pop("steps", 12),
                            batch_size=2, lr=2e-3, warmup=2, ckpt_every=kw.pop("ckpt_every", 6),
                            threads=1, **kw)


_create_model = fmrt.create_model


def _tiny_model(*_args, **_kw):
    # a narrow 2-block encoder so a step costs ~0.1 s
    from fmrt.models.sam import SAM_CONFIGS

    enc = SAM_CONFIGS["shapes-sam-tiny"].encoder.to_dict()
    return _create_model("shapes-sam-tiny", encoder={**enc, "embed_dim": 64, "depth": 2,
                                                     "global_attn_indexes": (1,)})


def test_step_is_deterministic_and_loss_decreases():
    torch.manual_seed(0)
    m = _tiny_model().train()
    cfg = T.SamTrainConfig(batch_size=2, correction_iters=2)
    stream = SamPromptStream(SamPromptConfig(max_prompts_per_image=2), batch_size=2)
    batch = stream(0)  # 4 prompts: 3 points, 1 box
    assert sorted(batch["kinds"].tolist()) == [0, 0, 0, 1]
    l1, logs = T.train_step_loss(m, batch, cfg, 0)
    l2, _ = T.train_step_loss(m, batch, cfg, 0)
    assert l1.item() == l2.item()
    assert {"focal", "dice", "iou_mse", "iou0", "iou1", "iou2"} <= set(logs)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):  # over-fit one batch
        loss, _ = T.train_step_loss(m, batch, cfg, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_train_resume_is_exact(tmp_path, monkeypatch):
    from fmrt.pretrained import load_pretrained
    from fmrt.train import common

    monkeypatch.setattr(fmrt, "create_model", _tiny_model)
    full = load_pretrained(T.train(_tiny_cfg(tmp_path / "a", steps=8), progress=False)).model
    # the same run interrupted right after its step-4 checkpoint, then resumed to step 8
    save = common.save_checkpoint

    def save_then_stop(out_dir, model, opt, step, extra=None):
        save(out_dir, model, opt, step, extra)
        if step == 4:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(common, "save_checkpoint", save_then_stop)
    with pytest.raises(RuntimeError, match="interrupted"):
        T.train(_tiny_cfg(tmp_path / "b", steps=8, ckpt_every=4), progress=False)
    monkeypatch.setattr(common, "save_checkpoint", save)
    resumed = load_pretrained(T.train(_tiny_cfg(tmp_path / "b", steps=8, ckpt_every=4),
                                      progress=False)).model
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    conf = load_pretrained(str(tmp_path / "b" / "run" / "model")).config
    assert conf["family"] == "sam" and conf["provenance"]["seed"] == 0
    assert conf["provenance"]["train_config"]["correction_iters"] == 2


def test_cli_routes_sam(tmp_path, monkeypatch):
    from fmrt import cli

    seen = {}

    def fake_train(cfg, eval_n=0):
        seen["cfg"], seen["eval_n"] = cfg, eval_n
        return str(tmp_path)

    monkeypatch.setattr(T, "train", fake_train)
    assert cli.main(["train", "sam", "--out", str(tmp_path), "--steps", "3",
                     "--correction-iters", "1", "--eval-n", "5"]) == 0
    assert seen["cfg"].steps == 3 and seen["cfg"].correction_iters == 1 and seen["eval_n"] == 5


# ------------------------------------------------------------------------------------ bundle


def test_bundled_shapes_sam_segments():
    from fmrt.pretrained import is_pretrained, load_pretrained, read_config

    if not is_pretrained("shapes-sam"):
        pytest.skip("shapes-sam not bundled")
    cfg = read_config("shapes-sam")
    assert cfg["family"] == "sam" and "command" in cfg["provenance"]
    m = load_pretrained("shapes-sam").model
    r = T.evaluate_sam(m, n=12, seed=0)
    assert r["objects"] >= 12
    # 0.99 / 0.99 on 1000 test scenes (provenance eval_test); a sanity margin on 12 scenes
    assert r["point_best"] > 0.9 and r["box_best"] > 0.9 and r["point_top"] > 0.85, r


def test_cli_eval_routes_sam(capsys):
    from fmrt import cli
    from fmrt.pretrained import is_pretrained

    if not is_pretrained("shapes-sam"):
        pytest.skip("shapes-sam not bundled")
    assert cli.main(["eval", "shapes-sam", "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "sam.point_best" in out and "sam.box_best" in out
