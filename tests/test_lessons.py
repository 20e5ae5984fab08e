"""``normops demo``: every lesson runs in quick mode, saves its plot, and its measured results show
the effect it teaches; the ``demo`` subcommand dispatches, lists and refuses as documented.

The thresholds are far from the measured values (quoted next to each, seed 0, quick mode), so
they hold across torch versions and thread counts, yet each fails if the effect is gone: a
lesson that compared a module with itself, used the biased running variance, or mixed up train
and eval would trip them. Where a lesson reports an error it computed itself, a check below also
recomputes the quantity independently with torch.nn.
"""

import pytest
import torch

from normops import cli, lessons
from normops.lessons import batch_norm, sequences

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH1_ERROR = "Expected more than 1 value per channel when training"


def run(name, tmp_path, **kw):
    results = lessons.run(name, str(tmp_path), quick=True, **kw)
    path = tmp_path / f"{name}.png"
    assert results["plot"] == str(path)
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC and path.stat().st_size > 10_000  # a real figure, not an empty canvas
    assert results["seconds"] > 0
    return results


def test_registry():
    assert list(lessons.LESSONS) == ["batchnorm", "with-without", "batch-size", "sequences", "style", "mistakes",
                                     "tiled-vae"]
    for desc, fn in lessons.LESSONS.values():
        assert isinstance(desc, str) and desc and "\n" not in desc
        assert callable(fn)
    with pytest.raises(ValueError, match="unknown lesson 'nope'; choose from: batchnorm, with-without"):
        lessons.run("nope")
    with pytest.raises(ValueError, match="norm must be one of"):
        lessons.run("style", norm="numpy")


def test_batchnorm(tmp_path, capsys):
    r = run("batchnorm", tmp_path)
    out = capsys.readouterr().out
    assert "running_var  = 0.9 * 1 + 0.1 * var_unbiased" in out
    # by hand (NumPy float64) vs the fp32 module: ~1e-7 for outputs, ~3e-6 for running_var ~ 9 after 20 steps
    assert r["train_output_err"] < 1e-5 and r["eval_output_err"] < 1e-5
    assert r["running_step1_err"] < 1e-6 and r["running_err"] < 2e-5 and r["cumulative_err"] < 1e-5
    # the unbiased variance is what the module uses: the biased one would be off by 7.5e-3
    assert r["biased_var_would_be_off"] > 100 * r["running_step1_err"]
    assert r["train_vs_eval_max_diff"] > 0.05  # 0.2
    assert r["eval_alone_vs_in_batch"] < 1e-6 and r["train_alone_vs_in_batch"] > 0.05  # 0.0 vs 0.25
    assert r["num_batches_tracked"] == r["steps"] == batch_norm.QUICK_STEPS
    assert r["vs_other_output_err"] < 1e-5 and r["vs_other_running_err"] < 1e-5

    # independently: torch.nn.BatchNorm2d on the lesson's batches ends with the reported statistics
    batches, _, _ = batch_norm.data(0, batch_norm.QUICK_STEPS)
    ref, cum = torch.nn.BatchNorm2d(batch_norm.C), torch.nn.BatchNorm2d(batch_norm.C, momentum=None)
    for x in batches:
        ref(x)
        cum(x)
    torch.testing.assert_close(torch.tensor(r["running_mean"]), ref.running_mean)
    torch.testing.assert_close(torch.tensor(r["running_var"]), ref.running_var)
    torch.testing.assert_close(torch.tensor(r["cumulative_var"]), cum.running_var)
    # 20 batches of 128 values: the plain average is within 5 standard errors of the true mean
    stderr = torch.tensor(batch_norm.TRUE_STD) / (128 * batch_norm.QUICK_STEPS) ** 0.5
    assert ((torch.tensor(r["cumulative_mean"]) - torch.tensor(r["true_mean"])).abs() < 5 * stderr).all()


def test_with_without(tmp_path):
    r = run("with-without", tmp_path)
    assert r["same_init"]
    runs = r["runs"]
    assert all(len(v["loss"]) == len(v["test_acc"]) == r["epochs"] for v in runs.values())
    low, high = r["lrs"][0], r["lrs"][-1]
    # small lr: BatchNorm 97.6%, no norm 10.9% (barely started)
    assert runs[f"batch@{low}"]["test_acc"][-1] > 0.9
    assert runs[f"none@{low}"]["test_acc"][-1] < runs[f"batch@{low}"]["test_acc"][-1] - 0.4
    # large lr: the un-normalized net is stuck at chance (or diverges), BatchNorm still learns (94.7%)
    assert runs[f"none@{high}"]["status"] in ("stuck at chance", "diverged")
    assert runs[f"none@{high}"]["test_acc"][-1] < 0.2
    assert runs[f"batch@{high}"]["status"] == "learning" and runs[f"batch@{high}"]["test_acc"][-1] > 0.85


def test_batch_size(tmp_path):
    r = run("batch-size", tmp_path)
    acc = r["accuracy"]
    assert set(acc) == {"batch", "layer", "group", "instance"}
    assert all(set(v) == {str(bs) for bs in r["batch_sizes"]} for v in acc.values())
    # at batch 1 BatchNorm trains the very network InstanceNorm trains (weights equal: 0.0) ...
    assert r["batch1_batchnorm_vs_instancenorm_weights"] < 1e-5
    assert r["batchnorm2d_batch1_vs_instance"] < 1e-5
    # ... run per image it scores what InstanceNorm scores (90.9%), with running statistics far less (70.7%)
    assert abs(r["batch1_batchnorm_per_image_accuracy"] - acc["instance"]["1"]) < 1e-6
    assert acc["batch"]["1"] < acc["instance"]["1"] - 0.05
    assert acc["batch"]["1"] < max(acc["layer"]["1"], acc["group"]["1"]) - 0.03  # 70.7% vs 86.7%
    gap = r["batchnorm_train_eval_gap"]
    big = str(r["batch_sizes"][-1])
    assert gap["1"] > 1.5 * gap[big]  # 0.77 vs 0.25
    assert r["image_mean_spread"]["exposure"] > 5 * r["image_mean_spread"]["scans"]
    assert BATCH1_ERROR in r["batchnorm1d_batch1_error"]


def test_sequences(tmp_path):
    r = run("sequences", tmp_path)
    assert r["layernorm_context_max_diff"] < 1e-6  # 0.0: a token's LayerNorm sees that token only
    assert r["batchnorm_context_max_diff"] > 0.5  # 1.9
    assert 0.2 < r["pad_fraction"] < 0.6
    # the running mean learned the padding: every feature ~(1 - 39%) of the real tokens' mean
    for rm, real in zip(r["running_mean"], r["real_token_mean"]):
        assert abs(rm) < 0.8 * abs(real)
    assert r["eval_output_mean_max_abs"] > 0.3  # 0.7: real tokens come out off-centre in eval
    assert r["batch1_batchnorm_vs_instancenorm"] < 1e-5
    assert BATCH1_ERROR in r["batch1_pooled_error"]


def test_sequences_with_torch_norms_match_and_leave_global_state(tmp_path):
    """norm="torch" gives the numbers normops gives; a lesson leaves the thread count and the
    global RNG as it found them."""
    torch.manual_seed(123)
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    ours = sequences.run(str(tmp_path / "normops"), quick=True)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)
    theirs = sequences.run(str(tmp_path / "torch"), quick=True, norm="torch")
    for key in ("batchnorm_context_max_diff", "pad_fraction", "eval_output_mean_max_abs"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-5)
    torch.testing.assert_close(torch.tensor(theirs["running_mean"]), torch.tensor(ours["running_mean"]))


def test_style(tmp_path):
    r = run("style", tmp_path)
    assert r["instance_max_diff"] < 1e-5  # 1.2e-6: every style gives the same InstanceNorm output
    assert r["instance_out_mean_max_abs"] < 1e-5
    assert r["uniform_styles"] and r["per_channel_styles"]
    for s in r["uniform_styles"]:  # one gain and offset per image: LayerNorm removes them too
        assert r["layer_max_diff"][s] < 1e-5
    for s in r["per_channel_styles"]:  # a color cast: LayerNorm does not (2.3, 1.4)
        assert r["layer_max_diff"][s] > 0.5
    assert min(r["batch_max_diff"].values()) > 0.5  # BatchNorm: batch statistics (1.3 and more)
    assert r["adain_mean_err"] < 1e-4 and r["adain_std_err"] < 1e-4


def test_mistakes(tmp_path):
    r = run("mistakes", tmp_path)
    ev, one, inst = r["forgot_eval"], r["batch_of_one"], r["instance_classification"]
    # 1. no model.eval(): the answer depends on the batch
    assert ev["eval_logit_spread"] < 1e-5 and ev["train_logit_spread"] > 0.5  # 4.8e-7 vs 2.2
    assert ev["flipped"]["eval"] == 0.0 and ev["flipped"]["train"] > 0.01  # 0% vs 6.7%
    acc = ev["accuracy"]
    assert acc["eval"] > 0.9  # 97.6%
    assert acc["train mode, class-sorted batches of 32"] < acc["eval"] - 0.3  # 24.4%
    assert acc["train mode, random batches of 2"] < acc["eval"] - 0.2  # 39.3%
    assert ev["running_mean_drift"] > 1e-3  # inference in train mode rewrote the running statistics
    # 2. batch size 1
    assert BATCH1_ERROR in one["error"] and BATCH1_ERROR in one["loop_error"]
    assert one["loop_steps"] == 25 and one["eval_ok"]
    assert one["batchnorm2d_vs_instancenorm"] < 1e-5
    # 3. InstanceNorm blind to the class held in the exposure: chance (36.9%) vs BatchNorm (99.3%)
    assert inst["accuracy"]["instance"] < 0.5 and inst["accuracy"]["batch"] > 0.9
    assert inst["instance_same_answer"] == 1.0


def test_tiled_vae(tmp_path):
    pytest.importorskip("diffusers")
    from normops.lessons import tiled_vae

    r = run("tiled-vae", tmp_path)
    # the exact walk: fp32 rounding through ~20 layers (measured 3.8e-6 on outputs up to 2.2), and
    # summation order only in float64 (6.9e-15); diffusers' tiles change every GroupNorm's statistics (1.2)
    assert r["exact_err"] < 1e-4 and r["exact_err_float64"] < 1e-12
    assert r["diffusers_tiled_err"] > 1000 * r["exact_err"]
    assert min(r["peak_whole"], r["peak_exact"], r["peak_diffusers_tiled"]) > 0
    # independently: another, uneven tiling (5 + 5 + 5 + 1: a tile one pixel wide) against the
    # whole decode of diffusers' module
    vae = tiled_vae.tiny_vae(1)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert (tiled_vae.exact_tiled_decode(vae, z, 5) - ref).abs().max() < 1e-4


# --- the command line --------------------------------------------------------------------------

def demo(capsys, *argv):
    code = cli.main(["demo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_and_usage_errors(capsys):
    code, out, _ = demo(capsys, "--list")
    assert code == 0 and all(name in out for name in lessons.LESSONS)
    code, _, err = demo(capsys, "nope")
    assert code == 2 and "unknown lesson 'nope'" in err and all(name in err for name in lessons.LESSONS)
    code, _, err = demo(capsys)
    assert code == 2 and "name a lesson" in err


def test_cli_runs_a_lesson(tmp_path, capsys):
    code, out, _ = demo(capsys, "style", "--quick", "--out", str(tmp_path / "new"), "--norm", "torch", "--seed", "1")
    assert code == 0
    assert "norms from torch" in out and "(style: " in out
    assert (tmp_path / "new" / "style.png").exists()


def test_cli_all_runs_every_lesson_and_reports_failures(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(name, fail=False):
        def lesson(out_dir, quick, seed, norm):
            calls.append((name, out_dir, quick, seed, norm))
            if fail:
                raise RuntimeError("boom")
            return {"seconds": 0.5}
        return lesson

    monkeypatch.setattr(lessons, "LESSONS", {"a": ("first", fake("a")), "b": ("second", fake("b", fail=True)),
                                             "c": ("third", fake("c"))})
    code, out, err = demo(capsys, "all", "--quick", "--out", str(tmp_path), "--seed", "3")
    assert code == 1
    assert calls == [(n, str(tmp_path), True, 3, "normops") for n in "abc"]
    assert "lesson b failed: RuntimeError: boom" in err
    assert "2 of 3 lessons ran; failed: b" in out
