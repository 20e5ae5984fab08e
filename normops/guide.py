"""``normops guide``: which normalization to use, as the original material's decision tree.

The tree (seed material, "Which Normalization to Use?"), with the leaf each task reaches:

    Working with images?
      yes -> Classification/Detection?
               yes -> Large batch (>= 16)?  yes -> BatchNorm    (SyncBatchNorm when multi-GPU)
                                            no  -> GroupNorm
               no  -> Style Transfer/GANs?  yes -> InstanceNorm
                                            no  -> (no leaf: segmentation takes GroupNorm, the
                                                    material's U-Net example)
      no  -> NLP/Sequences?    yes -> LayerNorm
               no  -> Online learning?     yes -> LayerNorm/InstanceNorm
    Other considerations: multi-GPU training -> SyncBatchNorm; video -> GroupNorm;
                          medical imaging -> GroupNorm

``recommend(task, batch_size, multi_gpu)`` walks it and returns the leaf, the normops module to
build and the path taken; ``normops guide --task T [--batch-size N] [--multi-gpu]`` prints that,
``normops guide`` alone asks the tree's questions on stdin, ``normops guide --table`` prints the
quick-reference table. ``batch_size`` is what one training step's statistics would cover: with
``multi_gpu``, the global batch, which is what SyncBatchNorm's statistics cover.
"""
import argparse
import dataclasses
import sys
from typing import Optional, Tuple

from normops.cliutil import positive_int_arg, text_table

BATCH_THRESHOLD = 16  # the tree's "Large batch (>= 16)?"

# Canonical task -> the branch of the tree it takes. Aliases name the same task.
TASKS = {
    "image-classification": "classify", "detection": "classify",
    "segmentation": "segment",
    "style-transfer": "style", "gan": "style", "image-to-image": "style",
    "nlp": "nlp", "transformer": "nlp",
    "rnn": "rnn", "sequence": "rnn",
    "video": "video", "medical": "medical",
    "online-learning": "online",
}
ALIASES = {"classification": "image-classification", "object-detection": "detection", "lstm": "rnn",
           "sequences": "sequence", "medical-imaging": "medical", "online": "online-learning"}

# The normops module each leaf builds (C: channels, D: feature size).
MODULES = {
    "BatchNorm": "normops.nn.BatchNorm2d(C)",
    "SyncBatchNorm": "normops.nn.SyncBatchNorm(C)",
    "GroupNorm": "normops.nn.GroupNorm(32, C)",
    "InstanceNorm": "normops.nn.InstanceNorm2d(C)",
    "LayerNorm": "normops.nn.LayerNorm(D)",
}
_LAYER_NORM_MODULES = {"nlp": "normops.nn.LayerNorm(d_model)", "rnn": "normops.nn.LayerNorm(hidden_size)"}

# The tree's questions, as the path and the interactive mode word them.
Q_IMAGES = "Working with images?"
Q_CLASSIFY = "Classification/Detection?"
Q_BATCH = f"Large batch (>= {BATCH_THRESHOLD})?"
Q_STYLE = "Style Transfer/GANs?"
Q_NLP = "NLP/Sequences?"
Q_ONLINE = "Online learning?"
Q_MULTI_GPU = "Multi-GPU training?"


@dataclasses.dataclass(frozen=True)
class Recommendation:
    norm: str               # the tree's leaf: "BatchNorm", "GroupNorm", ...
    module: str             # what to build: "normops.nn.GroupNorm(32, C)"
    reason: str             # why, in a sentence or two
    path: Tuple[str, ...]   # the questions and answers that led there, last "-> leaf"

    def __str__(self):
        steps = "\n".join(f"  {step}" for step in self.path)
        return (f"Use {self.norm}: {self.module}\n\nWhy: {self.reason}\n\nPath through the decision tree:\n{steps}\n\n"
                f"{_fusion_hint(self.norm, self.module)}")


def _fusion_hint(norm, module):
    """What normops fuses around this norm: the residual add of a pre-norm block for LayerNorm, the
    activation that follows it otherwise (Conv -> Norm -> Activation)."""
    if norm.startswith("LayerNorm"):
        return ("In a pre-norm block (h = x + sublayer(x); y = LayerNorm(h)), normops fuses the residual add: "
                "y, h = normops.functional.add_layer_norm(sublayer_out, h, [d_model], weight, bias)")
    return ("Where an activation follows the norm (Conv -> Norm -> Activation), normops fuses it: "
            + _with_activation(module))


def _with_activation(module):
    return module[:-1] + ', activation="relu")'


def canonical_task(task):
    """The canonical name of ``task`` (case, spaces and underscores ignored; aliases resolved), or
    ValueError naming the tasks there are."""
    key = str(task).strip().lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return key


def needs_batch_size(task):
    """Whether the tree asks for the batch size on ``task``'s path."""
    return TASKS[canonical_task(task)] == "classify"


def recommend(task: str, batch_size: Optional[int] = None, multi_gpu: bool = False) -> Recommendation:
    """The decision tree's answer for ``task`` (see ``TASKS``). ``batch_size`` is required where the
    path asks for it (image-classification, detection) and ignored elsewhere; ``multi_gpu`` turns a
    BatchNorm answer into SyncBatchNorm. Raises ValueError on an unknown task or a missing or
    invalid batch size."""
    name = canonical_task(task)
    branch = TASKS[name]
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if branch == "classify" and batch_size is None:
        raise ValueError(f"{name}: the answer depends on the batch size (BatchNorm at >= {BATCH_THRESHOLD}, "
                         f"GroupNorm below); give batch_size")
    images = [f"{Q_IMAGES} yes ({name})"]
    not_images = [f"{Q_IMAGES} no ({name})"]

    if branch == "classify":
        path = images + [f"{Q_CLASSIFY} yes"]
        if batch_size >= BATCH_THRESHOLD:
            path.append(f"{Q_BATCH} yes (batch size {batch_size})")
            if multi_gpu:
                path += ["-> BatchNorm", f"Other considerations: {Q_MULTI_GPU} yes -> SyncBatchNorm"]
                return _leaf("SyncBatchNorm", path, (
                    f"batch size {batch_size} >= {BATCH_THRESHOLD} gives BatchNorm stable batch statistics; across "
                    f"GPUs each one would see only its share of the batch, so SyncBatchNorm computes them over the "
                    f"whole batch (normops.nn.SyncBatchNorm.convert_sync_batchnorm(model) converts a model)."))
            return _leaf("BatchNorm", path, (
                f"batch size {batch_size} >= {BATCH_THRESHOLD}: batch statistics are stable, and BatchNorm is the "
                f"standard for CNN classification and detection. Call model.eval() before inference: it then "
                f"normalizes with its running statistics."))
        path.append(f"{Q_BATCH} no (batch size {batch_size})")
        return _leaf("GroupNorm", path, (
            f"batch size {batch_size} < {BATCH_THRESHOLD}: BatchNorm's batch statistics would be noisy (at batch "
            f"size 1 it trains as an InstanceNorm, and eval's running statistics do not match); GroupNorm "
            f"normalizes each sample over groups of channels, independent of the batch size and the same in "
            f"training and eval."), multi_gpu)
    if branch == "style":
        path = images + [f"{Q_CLASSIFY} no", f"{Q_STYLE} yes"]
        return _leaf("InstanceNorm", path, (
            "each image is normalized per channel over its own pixels, which removes its contrast and style and "
            "mixes nothing across the batch: the norm of CycleGAN and Pix2Pix."), multi_gpu)
    if branch == "segment":
        path = images + [f"{Q_CLASSIFY} no", f"{Q_STYLE} no",
                         "the tree has no leaf here: segmentation follows the material's U-Net example"]
        return _leaf("GroupNorm", path, (
            "segmentation trains on few large images a step, too few for BatchNorm's statistics; the material's "
            "U-Net uses GroupNorm, which is per sample (BatchNorm, or SyncBatchNorm across GPUs, only with batches "
            f">= {BATCH_THRESHOLD})."), multi_gpu)
    if branch in ("video", "medical"):
        what = {"video": "Video data", "medical": "Medical imaging"}[branch]
        inputs = {"video": "clips (N, C, T, H, W) are large, so batches are small",
                  "medical": "volumes are large, so batches are a few samples"}[branch]
        path = [f"Other considerations: {what} -> GroupNorm"]
        return _leaf("GroupNorm", path, (
            f"{inputs}; GroupNorm normalizes each sample over groups of channels, independent of the batch "
            f"size."), multi_gpu)
    if branch in ("nlp", "rnn"):
        path = not_images + [f"{Q_NLP} yes"]
        reason = ("each token (or time step) is normalized over its features, independent of the batch and of the "
                  "sequence length, and the same in training and eval: the standard of Transformers")
        reason += (" (normops.nn.RMSNorm(d_model) is the cheaper variant of Llama and T5)." if branch == "nlp"
                   else "; in an RNN or LSTM, normalize the hidden state at each step.")
        return _leaf("LayerNorm", path, reason, multi_gpu, module=_LAYER_NORM_MODULES[branch])
    path = not_images + [f"{Q_NLP} no", f"{Q_ONLINE} yes"]  # online learning
    return _leaf("LayerNorm", path, (
        "one sample at a time (batch size 1) has no batch statistics; LayerNorm (or InstanceNorm, "
        "normops.nn.InstanceNorm2d(C), for image inputs) normalizes each sample on its own, the same in "
        "training and eval."), multi_gpu, leaf="LayerNorm/InstanceNorm")


def _leaf(norm, path, reason, multi_gpu=False, module=None, leaf=None):
    path = list(path)
    if not path[-1].startswith("Other considerations"):
        path.append(f"-> {leaf or norm}")
    if multi_gpu and norm not in ("BatchNorm", "SyncBatchNorm"):
        path.append(f"{Q_MULTI_GPU} yes: {norm} is per sample, nothing to synchronize across GPUs")
    return Recommendation(norm, module or MODULES[norm], reason, tuple(path))


# --- the quick-reference table ------------------------------------------------------------------

TABLE_HEADERS = ["norm", "normalizes over (N, C, H, W)", "batch-dependent", "train/eval differ", "running stats",
                 "typical use"]
TABLE = [
    ["BatchNorm", "N, H, W per C", "yes", "yes", "yes", "CNN classification/detection, batch >= 16"],
    ["SyncBatchNorm", "N (all GPUs), H, W per C", "yes", "yes", "yes", "BatchNorm in multi-GPU training"],
    ["LayerNorm", "C, H, W per N", "no", "no", "no", "Transformers, RNNs, small batches"],
    ["RMSNorm", "C, H, W per N (no mean)", "no", "no", "no", "LLM Transformers (Llama, T5)"],
    ["InstanceNorm", "H, W per N and C", "no", "no*", "no*", "style transfer, image-to-image GANs"],
    ["GroupNorm", "C/G, H, W per N and group", "no", "no", "no", "small batches, segmentation, video, medical"],
]
TABLE_NOTES = ("LayerNorm and RMSNorm normalize the last dims (normalized_shape): (C, H, W) of an image, the D\n"
               "features of a token; RMSNorm divides by the root mean square and subtracts no mean. * yes with\n"
               "track_running_stats=True. normops.nn: BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, RMSNorm,\n"
               "InstanceNorm1d/2d/3d, GroupNorm, each with activation=\"relu\"|\"silu\"|\"gelu\" fused into the norm.")


def format_reference_table():
    return f"{text_table(TABLE_HEADERS, TABLE)}\n{TABLE_NOTES}"


# --- the command --------------------------------------------------------------------------------

def add_parser(subparsers):
    """Register ``normops guide`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "guide", help="which normalization to use: the decision tree",
        description="Walk the decision tree 'Which Normalization to Use?' for a task and print the norm, the "
                    "normops module to build and the path through the tree. Without --task (or --table) it asks "
                    "the tree's questions on stdin. Exit status 0 with an answer, 2 on an unknown task, a missing "
                    "batch size or an input that ends before an answer.")
    p.add_argument("--task", help=f"what the model does: {', '.join(TASKS)}")
    p.add_argument("--batch-size", type=positive_int_arg, metavar="N",
                   help=f"samples a training step normalizes over (all GPUs together); BatchNorm from "
                        f"{BATCH_THRESHOLD}, GroupNorm below (image-classification, detection)")
    p.add_argument("--multi-gpu", action="store_true", default=None,
                   help="training on several GPUs: SyncBatchNorm where BatchNorm is the answer")
    p.add_argument("--table", action="store_true", help="print the quick-reference table of the norms")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args):
    """``normops guide``; returns the exit status."""
    if args.table:
        print(format_reference_table())
        if args.task is None:
            return 0
        print()
    if args.task is None:
        return _interactive(args.batch_size, args.multi_gpu)
    try:
        if needs_batch_size(args.task) and args.batch_size is None:
            raise ValueError(f"--task {canonical_task(args.task)} needs --batch-size: the tree answers BatchNorm "
                             f"from {BATCH_THRESHOLD} samples a step, GroupNorm below")
        rec = recommend(args.task, args.batch_size, bool(args.multi_gpu))
    except ValueError as e:
        print(f"normops guide: error: {e}", file=sys.stderr)
        return 2
    print(rec)
    return 0


class _EndOfInput(Exception):
    pass


def _ask(question, parse):
    """Ask on stdout, read a line of stdin (looked up per call, so tests can feed it); ask again
    after an answer ``parse`` rejects; _EndOfInput when stdin ends."""
    while True:
        sys.stdout.write(f"{question} ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            raise _EndOfInput
        try:
            return parse(line.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            print(f"  {e}")


def _yes_no(text):
    answer = text.lower()
    if answer in ("y", "yes"):
        return True
    if answer in ("n", "no"):
        return False
    raise ValueError("answer y or n")


def _choice(*options):
    def parse(text):
        if text.lower() not in options:
            raise ValueError(f"answer one of: {', '.join(options)}")
        return text.lower()
    return parse


def _interactive(batch_size=None, multi_gpu=None):
    """The tree's questions on stdin; ``batch_size`` and ``multi_gpu`` (from flags) are not asked."""
    try:
        task = _ask_task()
        if task is None:
            print("The decision tree has no leaf for this; see `normops guide --table` for what each norm does.")
            return 1
        if needs_batch_size(task) and batch_size is None:
            batch_size = _ask("Batch size per training step (all GPUs together)?", positive_int_arg)
        if multi_gpu is None and recommend(task, batch_size).norm == "BatchNorm":
            multi_gpu = _ask(f"{Q_MULTI_GPU} [y/n]", _yes_no)
    except _EndOfInput:
        print()
        print("normops guide: error: input ended before an answer; non-interactively: "
              "normops guide --task TASK [--batch-size N] [--multi-gpu]", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    print()
    print(recommend(task, batch_size, bool(multi_gpu)))
    return 0


def _ask_task():
    """Walk the tree's questions to a task name, or None where the tree has no leaf."""
    if _ask(f"{Q_IMAGES} [y/n]", _yes_no):
        if _ask(f"{Q_CLASSIFY} [y/n]", _yes_no):
            return "image-classification"
        if _ask(f"{Q_STYLE} (image-to-image) [y/n]", _yes_no):
            return "style-transfer"
        return _ask("Segmentation, video or medical imaging? [segmentation/video/medical]",
                    _choice("segmentation", "video", "medical"))
    if _ask(f"{Q_NLP} [y/n]", _yes_no):
        return "rnn" if _ask("Recurrent (RNN/LSTM)? [y/n]", _yes_no) else "nlp"
    if _ask(f"{Q_ONLINE} (one sample at a time) [y/n]", _yes_no):
        return "online-learning"
    answer = _ask("Video or medical data? [video/medical/no]", _choice("video", "medical", "no"))
    return None if answer == "no" else answer
