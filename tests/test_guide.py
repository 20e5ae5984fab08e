"""``normops guide``: ``recommend`` over every path of the seed's decision tree, the command with
flags, with answers fed on stdin (interactive), at the end of input, and on usage errors.

The command runs through a parser built here with ``guide.add_parser`` (the one ``normops.cli``
registers), in-process: nothing here needs more than the standard library and normops.
"""
import io
import re
import sys

import pytest
import torch

import normops
from cases import argparse_rejects
from normops import cli, guide

IMAGES, NOT_IMAGES = "Working with images? yes", "Working with images? no"

# (task, batch_size, multi_gpu) -> (norm, module, path): every leaf of the tree, both sides of the
# batch threshold, and multi-GPU on a BatchNorm and on a per-sample answer.
LEAVES = [
    (("image-classification", 64, False), ("BatchNorm", "normops.nn.BatchNorm2d(C)", [
        IMAGES + " (image-classification)", "Classification/Detection? yes", "Large batch (>= 16)? yes (batch size 64)",
        "-> BatchNorm"])),
    (("image-classification", 16, False), ("BatchNorm", "normops.nn.BatchNorm2d(C)", [
        IMAGES + " (image-classification)", "Classification/Detection? yes", "Large batch (>= 16)? yes (batch size 16)",
        "-> BatchNorm"])),
    (("image-classification", 15, False), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        IMAGES + " (image-classification)", "Classification/Detection? yes", "Large batch (>= 16)? no (batch size 15)",
        "-> GroupNorm"])),
    (("detection", 2, False), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        IMAGES + " (detection)", "Classification/Detection? yes", "Large batch (>= 16)? no (batch size 2)",
        "-> GroupNorm"])),
    (("detection", 256, True), ("SyncBatchNorm", "normops.nn.SyncBatchNorm(C)", [
        IMAGES + " (detection)", "Classification/Detection? yes", "Large batch (>= 16)? yes (batch size 256)",
        "-> BatchNorm", "Other considerations: Multi-GPU training? yes -> SyncBatchNorm"])),
    (("image-classification", 4, True), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        IMAGES + " (image-classification)", "Classification/Detection? yes", "Large batch (>= 16)? no (batch size 4)",
        "-> GroupNorm", "Multi-GPU training? yes: GroupNorm is per sample, nothing to synchronize across GPUs"])),
    (("style-transfer", None, False), ("InstanceNorm", "normops.nn.InstanceNorm2d(C)", [
        IMAGES + " (style-transfer)", "Classification/Detection? no", "Style Transfer/GANs? yes", "-> InstanceNorm"])),
    (("gan", 1, False), ("InstanceNorm", "normops.nn.InstanceNorm2d(C)", [
        IMAGES + " (gan)", "Classification/Detection? no", "Style Transfer/GANs? yes", "-> InstanceNorm"])),
    (("image-to-image", None, True), ("InstanceNorm", "normops.nn.InstanceNorm2d(C)", [
        IMAGES + " (image-to-image)", "Classification/Detection? no", "Style Transfer/GANs? yes", "-> InstanceNorm",
        "Multi-GPU training? yes: InstanceNorm is per sample, nothing to synchronize across GPUs"])),
    (("segmentation", None, False), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        IMAGES + " (segmentation)", "Classification/Detection? no", "Style Transfer/GANs? no",
        "the tree has no leaf here: segmentation follows the material's U-Net example", "-> GroupNorm"])),
    (("nlp", None, False), ("LayerNorm", "normops.nn.LayerNorm(d_model)", [
        NOT_IMAGES + " (nlp)", "NLP/Sequences? yes", "-> LayerNorm"])),
    (("transformer", 512, True), ("LayerNorm", "normops.nn.LayerNorm(d_model)", [
        NOT_IMAGES + " (transformer)", "NLP/Sequences? yes", "-> LayerNorm",
        "Multi-GPU training? yes: LayerNorm is per sample, nothing to synchronize across GPUs"])),
    (("rnn", None, False), ("LayerNorm", "normops.nn.LayerNorm(hidden_size)", [
        NOT_IMAGES + " (rnn)", "NLP/Sequences? yes", "-> LayerNorm"])),
    (("sequence", 8, False), ("LayerNorm", "normops.nn.LayerNorm(hidden_size)", [
        NOT_IMAGES + " (sequence)", "NLP/Sequences? yes", "-> LayerNorm"])),
    (("online-learning", 1, False), ("LayerNorm", "normops.nn.LayerNorm(D)", [
        NOT_IMAGES + " (online-learning)", "NLP/Sequences? no", "Online learning? yes", "-> LayerNorm/InstanceNorm"])),
    (("video", 64, False), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        "Other considerations: Video data -> GroupNorm"])),
    (("medical", None, False), ("GroupNorm", "normops.nn.GroupNorm(32, C)", [
        "Other considerations: Medical imaging -> GroupNorm"])),
]


@pytest.mark.parametrize("query, expected", LEAVES, ids=lambda v: "-".join(map(str, v)) if len(v) == 3 else "")
def test_recommend_every_path(query, expected):
    rec = guide.recommend(*query)
    assert (rec.norm, rec.module, list(rec.path)) == expected
    assert rec.reason


def test_leaves_cover_every_task():
    assert {task for (task, _, _), _ in LEAVES} == set(guide.TASKS)


@pytest.mark.parametrize("norm, module", sorted({(r[0], r[1]) for _, r in LEAVES}))
def test_modules_build_the_norm_they_name(norm, module):
    """Each answer's module, and its fused-activation variant, is a real normops constructor."""
    sizes = {"normops": normops, "C": 64, "D": 16, "d_model": 16, "hidden_size": 16}
    for text in (module, guide._with_activation(module)):
        m = eval(text, sizes)
        assert type(m).__module__ == "normops.nn" and type(m).__name__.startswith(norm)
    assert m.activation == "relu"
    x = torch.randn(2, 64, 4, 4) if "(C)" in module or ", C)" in module else torch.randn(2, 3, 16)
    assert m(x).shape == x.shape


def test_recommend_aliases_and_spelling():
    assert guide.recommend("Image_Classification", 32).norm == "BatchNorm"
    assert guide.recommend("classification", 8).norm == "GroupNorm"
    assert guide.recommend("object detection", 8).norm == "GroupNorm"
    assert guide.recommend("LSTM").module == "normops.nn.LayerNorm(hidden_size)"
    assert guide.recommend("online").path[-1] == "-> LayerNorm/InstanceNorm"


@pytest.mark.parametrize("task, batch_size, message", [
    ("cooking", None, "unknown task 'cooking'; choose from image-classification"),
    ("image-classification", None, "depends on the batch size"),
    ("detection", None, "depends on the batch size"),
    ("image-classification", 0, "positive integer"),
    ("nlp", -3, "positive integer"),
    ("image-classification", 16.0, "positive integer"),
    ("image-classification", True, "positive integer"),
])
def test_recommend_rejects(task, batch_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        guide.recommend(task, batch_size)


# --- the command ---------------------------------------------------------------------------------

def main(argv):
    return cli.main(argv)


def run(capsys, monkeypatch, *argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["guide", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flags_answer_with_reason_and_module(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "--task", "image-classification", "--batch-size", "4")
    assert code == 0 and not err
    assert out.startswith("Use GroupNorm: normops.nn.GroupNorm(32, C)\n")
    assert "Large batch (>= 16)? no (batch size 4)" in out
    assert "Why: batch size 4 < 16" in out
    assert out.strip() == str(guide.recommend("image-classification", 4))
    assert 'normops.nn.GroupNorm(32, C, activation="relu")' in out


def test_flags_multi_gpu(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "--task", "detection", "--batch-size", "64", "--multi-gpu")
    assert code == 0
    assert out.startswith("Use SyncBatchNorm: normops.nn.SyncBatchNorm(C)")
    assert "convert_sync_batchnorm" in out
    code, out, _ = run(capsys, monkeypatch, "--task", "detection", "--batch-size", "64")
    assert code == 0 and out.startswith("Use BatchNorm: normops.nn.BatchNorm2d(C)")


def test_flags_ignore_stdin(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "--task", "nlp", stdin="")
    assert code == 0 and out.startswith("Use LayerNorm: normops.nn.LayerNorm(d_model)") and "[y/n]" not in out


def test_unknown_task_exits_2(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "--task", "cooking")
    assert code == 2 and not out
    assert "normops guide: error: unknown task 'cooking'" in err
    assert all(task in err for task in guide.TASKS)


def test_missing_batch_size_exits_2(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "--task", "image-classification", stdin="64\n")
    assert code == 2 and not out
    assert "--task image-classification needs --batch-size" in err


def test_usage_errors_in_parsing():
    assert argparse_rejects(main, ["guide", "--batch-size", "0"])
    assert argparse_rejects(main, ["guide", "--batch-size", "many"])


def test_table(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "--table", stdin="")
    assert code == 0
    lines = out.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == guide.TABLE_HEADERS
    rows = {}
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(guide.TABLE_HEADERS):
            break
        rows[cells[0]] = dict(zip(guide.TABLE_HEADERS, cells))
    assert set(rows) == {"BatchNorm", "SyncBatchNorm", "LayerNorm", "RMSNorm", "InstanceNorm", "GroupNorm"}
    # The seed's "Visual Comparison" for (N, C, H, W) and its comparison table.
    assert rows["BatchNorm"]["normalizes over (N, C, H, W)"] == "N, H, W per C"
    assert rows["LayerNorm"]["normalizes over (N, C, H, W)"] == "C, H, W per N"
    assert rows["InstanceNorm"]["normalizes over (N, C, H, W)"] == "H, W per N and C"
    assert rows["GroupNorm"]["normalizes over (N, C, H, W)"] == "C/G, H, W per N and group"
    assert "no mean" in rows["RMSNorm"]["normalizes over (N, C, H, W)"]
    for norm, row in rows.items():
        batch = norm in ("BatchNorm", "SyncBatchNorm")
        assert row["batch-dependent"] == ("yes" if batch else "no"), norm
        assert row["train/eval differ"].rstrip("*") == ("yes" if batch else "no"), norm
        assert row["running stats"].rstrip("*") == ("yes" if batch else "no"), norm
    assert "track_running_stats=True" in out


def test_table_with_task_prints_both(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "--table", "--task", "video")
    assert code == 0 and out.index("typical use") < out.index("Use GroupNorm: normops.nn.GroupNorm(32, C)")


# --- interactive ---------------------------------------------------------------------------------

# answers fed on stdin -> the recommend() call the walk must end in
DIALOGUES = [
    ("y\ny\n4\n", ("image-classification", 4, False)),
    ("y\ny\n32\nn\n", ("image-classification", 32, False)),
    ("yes\nY\n32\nyes\n", ("image-classification", 32, True)),
    ("y\nn\ny\n", ("style-transfer", None, False)),
    ("y\nn\nn\nsegmentation\n", ("segmentation", None, False)),
    ("y\nn\nn\nVideo\n", ("video", None, False)),
    ("y\nn\nn\nmedical\n", ("medical", None, False)),
    ("n\ny\nn\n", ("nlp", None, False)),
    ("n\ny\ny\n", ("rnn", None, False)),
    ("n\nn\ny\n", ("online-learning", None, False)),
    ("n\nn\nn\nmedical\n", ("medical", None, False)),
    ("n\nn\nn\nvideo\n", ("video", None, False)),
]


@pytest.mark.parametrize("answers, query", DIALOGUES)
def test_interactive_walks_the_tree(capsys, monkeypatch, answers, query):
    code, out, err = run(capsys, monkeypatch, stdin=answers)
    assert code == 0 and not err
    prompts, answer = out.split("\nUse ", 1)
    assert prompts.count("? ") == answers.count("\n")  # one question per answer, none more
    assert ("Multi-GPU training?" in prompts) == (query[1] is not None and query[1] >= 16)
    assert "Use " + answer.rstrip() == str(guide.recommend(*query))


def test_interactive_asks_again_after_a_bad_answer(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, stdin="maybe\ny\ny\nmany\n0\n20\nn\n")
    assert code == 0
    assert out.count("answer y or n") == 1
    assert out.count("expected a positive integer") == 2
    assert out.count("Batch size per training step") == 3
    assert "Use BatchNorm: normops.nn.BatchNorm2d(C)" in out


def test_interactive_takes_flags_it_was_given(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "--batch-size", "64", "--multi-gpu", stdin="y\ny\n")
    assert code == 0
    assert "Batch size" not in out and "Multi-GPU training? [y/n]" not in out
    assert "Use SyncBatchNorm" in out


def test_interactive_no_leaf(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, stdin="n\nn\nn\nno\n")
    assert code == 1 and not err
    assert "no leaf" in out and "Use " not in out


@pytest.mark.parametrize("answers", ["", "y\n", "y\ny\n", "y\ny\n32\n", "y\ny\nmany\n", "n\nn\nn\n"])
def test_end_of_input_exits_2_cleanly(capsys, monkeypatch, answers):
    code, out, err = run(capsys, monkeypatch, stdin=answers)
    assert code == 2
    assert "normops guide: error: input ended before an answer" in err
    assert "Traceback" not in err and "Use " not in out


def test_fusion_hint_fits_the_norm():
    """LayerNorm answers point at the fused residual add of a pre-norm block (no activation follows
    a pre-norm LayerNorm); the others at the fused activation of Conv -> Norm -> Activation."""
    text = str(guide.recommend("nlp"))
    assert "normops.functional.add_layer_norm" in text and "activation=" not in text
    text = str(guide.recommend("image-classification", batch_size=4))
    assert 'normops.nn.GroupNorm(32, C, activation="relu")' in text and "add_layer_norm" not in text
