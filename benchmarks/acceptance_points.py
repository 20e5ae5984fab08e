"""The performance points of the kernel issues (#3 row norms, #4 GroupNorm/InstanceNorm, #5
BatchNorm, #17 the language-model row-norm variants, #18 adaLN, #19 norm + quantize) as checks on timed cases, and their
verdicts: what benchmarks/acceptance.py measures. (#18's VAE-decoder GroupNorm shapes and ConvNeXt's
channels-first LayerNorm are benchmarks without a point: the issue names no bound for them.)

A case is an op of normops.bench on a shape, layout and pass, by a provider (normops, torch,
compile); a check compares one measured value with its bound; a point is the checks of one
sentence of an issue.
"""
import dataclasses

from normops.bench import OPS

TOKENS = 4096  # the rows of every row-norm point (#3: "H100, bf16, 4096 rows")
SD_UNET = [(2, 320, 64, 64), (2, 1280, 16, 16)]  # #4, 32 groups
VIDEO = (1, 128, 8, 256, 256)  # #4, the small-batch video shape, 32 groups
STYLE = [(1, 64, 256, 256), (4, 128, 128, 128), (4, 256, 64, 64)]  # #4, InstanceNorm2d
RESNET50 = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)]  # #5
LAYOUTS = ("contiguous", "channels_last")
# #17: the row-norm variants of normops.bench (Gemma, Llama, the fp32 residual stream, the gated
# norms, the in-place add: forward only)
LLM_VARIANTS = ("rms_norm_gemma", "rms_norm_llama", "add_rms_norm_fp32_residual", "gated_rms_norm",
                "gated_rms_norm_grouped", "add_rms_norm_")
# #18: DiT-XL/2's adaLN-Zero step at batch 8, 1024 tokens (256 px) and 4096 (512 px), hidden 1152
DIT_XL = [(8, 1024, 1152), (8, 4096, 1152)]
ADA_OPS = ("ada_layer_norm", "ada_layer_norm_gate_residual")
QUANT_OPS = ("rms_norm_quant", "rms_norm_quant_g128")  # #19: norm + float8 quantize, for inference



@dataclasses.dataclass(frozen=True)
class Case:
    """What one timed call is: an op of normops.bench on a shape, layout and pass, by a provider."""
    op: str
    shape: tuple
    layout: str
    pas: str
    provider: str = "normops"
    dtype: str = None  # a torch dtype's name; None: the run's --dtype

    def by(self, provider):
        return dataclasses.replace(self, provider=provider)

    @property
    def label(self):
        layout = "" if self.layout == "contiguous" else " cl"
        dtype = f" {self.dtype}" if self.dtype else ""
        return f"{self.op} {'x'.join(map(str, self.shape))}{layout}{dtype} {self.pas}"


@dataclasses.dataclass(frozen=True)
class Check:
    """One measured condition, value >= bound:
        "pct"      normops' GB/s on `case` as a percentage of the measured copy bandwidth
        "speedup"  time of `case` by provider `against` / time by normops
        "per_byte" normops' GB/s on `case` / its GB/s on the case `against` (a fused op against
                   the plain one: 1 / 1.05 = at most 5% dearer per byte)"""
    kind: str
    case: Case
    bound: float
    against: object = None

    def cases(self):
        other = self.case.by(self.against) if self.kind == "speedup" else self.against
        return [self.case] + ([other] if other is not None else [])


@dataclasses.dataclass(frozen=True)
class Point:
    issue: int
    text: str
    checks: tuple


def _rows(op, widths, pas):
    return [Case(op, (TOKENS, w), "contiguous", pas) for w in widths]


def points(families):
    """The performance sections of issues #3, #4, #5, #17, #18 and #19, as checks on cases."""
    out = []
    if "row_norm" in families:
        k = 1024
        fwd, fwd_wide, bwd = [k * i for i in (1, 2, 4, 8, 16, 32, 64)], [128 * k, 256 * k], [k * i for i in (1, 2, 4, 8, 16, 32)]
        fast, compiled, narrow = [4 * k, 8 * k, 16 * k, 32 * k, 64 * k, 128 * k, 256 * k], [4 * k, 16 * k, 64 * k], \
            [128, 256, 512, k]
        norms = ("layer_norm", "rms_norm")
        out += [
            Point(3, "forward >= 85% of copy bandwidth, widths 1K-64K",
                  tuple(Check("pct", c, 85) for op in norms for c in _rows(op, fwd, "fwd"))),
            Point(3, "forward >= 70% of copy bandwidth, widths 128K-256K",
                  tuple(Check("pct", c, 70) for op in norms for c in _rows(op, fwd_wide, "fwd"))),
            Point(3, "backward (dx, dw, db) >= 70% of copy bandwidth, widths 1K-32K",
                  tuple(Check("pct", c, 70) for op in norms for c in _rows(op, bwd, "bwd"))),
            Point(3, "fwd+bwd >= 1.5x torch.nn at widths >= 4K",
                  tuple(Check("speedup", c, 1.5, "torch") for op in norms for c in _rows(op, fast, "fwd+bwd"))),
            Point(3, "fwd+bwd >= 1.2x torch.compile at widths >= 4K",
                  tuple(Check("speedup", c, 1.2, "compile") for op in norms for c in _rows(op, compiled, "fwd+bwd"))),
            Point(3, "never slower than torch.nn at widths 128-1K (fwd, fwd+bwd)",
                  tuple(Check("speedup", c, 1.0, "torch") for op in norms for pas in ("fwd", "fwd+bwd")
                        for c in _rows(op, narrow, pas))),
            Point(3, "add+RMSNorm costs at most 5% more per byte than RMSNorm (fwd, fwd+bwd, 1K-64K)",
                  tuple(Check("per_byte", c, 1 / 1.05, dataclasses.replace(c, op="rms_norm"))
                        for pas in ("fwd", "fwd+bwd") for c in _rows("add_rms_norm", fwd, pas))),
            Point(17, "every language-model variant within 5% per byte of plain RMSNorm, fwd and bwd (1K, 8K, 64K)",
                  tuple(Check("per_byte", c, 1 / 1.05, dataclasses.replace(c, op="rms_norm"))
                        for op in LLM_VARIANTS for pas in ("fwd", "bwd") for c in _rows(op, [k, 8 * k, 64 * k], pas)
                        if pas in OPS[op].passes)),  # an in-place op: its forward
            # the torch provider of the adaLN ops is diffusers' unfused composition (normops.bench)
            Point(18, "adaLN + gate + residual fwd+bwd >= 2x diffusers' torch.nn composition, DiT-XL sizes, bf16",
                  tuple(Check("speedup", Case("ada_layer_norm_gate_residual", s, "contiguous", "fwd+bwd",
                                              dtype="bfloat16"), 2.0, "torch") for s in DIT_XL)),
            # the bytes: bf16 in, float8 out (normops.bench's out_itemsize)
            Point(19, "RMSNorm + float8 quantize >= 85% of copy bandwidth, 4096 x {4K, 8K}, bf16 (per row, per 128)",
                  tuple(Check("pct", Case(op, (TOKENS, w), "contiguous", "fwd", dtype="bfloat16"), 85)
                        for op in QUANT_OPS for w in (4 * k, 8 * k))),
        ]
    if "group_norm" in families:
        sd = [Case("group_norm", s, layout, "fwd+bwd") for layout in LAYOUTS for s in SD_UNET]
        gn_shapes = [(s, layout) for layout in LAYOUTS for s in SD_UNET] + [(VIDEO, "contiguous")]
        out += [
            Point(4, "GroupNorm fwd+bwd >= 3x torch.nn on the SD U-Net shapes, NCHW",
                  tuple(Check("speedup", c, 3.0, "torch") for c in sd if c.layout == "contiguous")),
            Point(4, "GroupNorm fwd+bwd >= 5x torch.nn on the SD U-Net shapes, channels_last",
                  tuple(Check("speedup", c, 5.0, "torch") for c in sd if c.layout == "channels_last")),
            Point(4, "GroupNorm fwd+bwd >= 10x torch.nn on the small-batch video shape",
                  (Check("speedup", Case("group_norm", VIDEO, "contiguous", "fwd+bwd"), 10.0, "torch"),)),
            Point(4, "GroupNorm+SiLU fwd+bwd >= 3x torch.nn GroupNorm then F.silu",
                  tuple(Check("speedup", Case("group_norm+silu", s, layout, "fwd+bwd"), 3.0, "torch")
                        for s, layout in gn_shapes)),
            Point(4, "GroupNorm forward >= 75% of copy bandwidth on those shapes",
                  tuple(Check("pct", Case("group_norm", s, layout, "fwd"), 75) for s, layout in gn_shapes)),
            Point(4, "GroupNorm backward >= 65% of copy bandwidth on those shapes",
                  tuple(Check("pct", Case("group_norm", s, layout, "bwd"), 65) for s, layout in gn_shapes)),
            Point(4, "InstanceNorm2d (affine) fwd+bwd >= 3x torch.nn on the style-transfer shapes",
                  tuple(Check("speedup", Case("instance_norm", s, "contiguous", "fwd+bwd"), 3.0, "torch")
                        for s in STYLE)),
        ]
    if "batch_norm" in families:
        def bn(op, layout, pas, dtype=None):
            return [Case(op, s, layout, pas, dtype=dtype) for s in RESNET50]
        # torch runs cuDNN for fp16 activations (with fp32 parameters), its own kernels for bf16
        # ones: the cuDNN points take both, each against what torch.nn runs for it
        both = [None, "float16"]
        out += [
            Point(5, "BatchNorm2d training fwd+bwd within 10% of torch.nn (cuDNN in fp16), channels_last",
                  tuple(Check("speedup", c, 1 / 1.1, "torch") for dt in both
                        for c in bn("batch_norm", "channels_last", "fwd+bwd", dt))),
            Point(5, "BatchNorm2d training fwd+bwd >= 1.5x torch.nn (cuDNN in fp16), NCHW",
                  tuple(Check("speedup", c, 1.5, "torch") for dt in both
                        for c in bn("batch_norm", "contiguous", "fwd+bwd", dt))),
            Point(5, "BatchNorm2d+ReLU fwd+bwd >= 1.3x torch.nn BatchNorm2d then ReLU",
                  tuple(Check("speedup", c, 1.3, "torch") for layout in LAYOUTS
                        for c in bn("batch_norm+relu", layout, "fwd+bwd"))),
            Point(5, "training forward >= 70% of copy bandwidth (2 reads + 1 write)",
                  tuple(Check("pct", c, 70) for layout in LAYOUTS for c in bn("batch_norm", layout, "fwd"))),
            Point(5, "inference forward >= 85% of copy bandwidth",
                  tuple(Check("pct", c, 85) for layout in LAYOUTS for c in bn("batch_norm_eval", layout, "fwd"))),
        ]
    return out


def smoke_points(families):
    """points() on tiny shapes: every dim at most 4 (rows: 8 x width / 1024)."""
    def small(case):
        shape = (8, max(1, case.shape[1] // 1024)) if case.op in ("layer_norm", "rms_norm", "add_rms_norm") else \
            (2, 4, 4) if case.op in ADA_OPS else \
            (min(case.shape[0], 2), 32) + tuple(min(d, 4) for d in case.shape[2:])
        return dataclasses.replace(case, shape=shape, dtype=None)

    def check(c):
        against = small(c.against) if isinstance(c.against, Case) else c.against
        return dataclasses.replace(c, case=small(c.case), against=against)
    return [dataclasses.replace(p, checks=tuple(check(c) for c in p.checks)) for p in points(families)]


def all_cases(pts, compile_=True):
    """Every case the points need, once, in the points' order."""
    cases = {c: None for p in pts for check in p.checks for c in check.cases()}
    return [c for c in cases if compile_ or c.provider != "compile"]


# --- verdicts ----------------------------------------------------------------------------------

def check_value(check, results):
    """The check's value from the measured records (keyed by Case); None if a case is not
    measured, "error" if one failed."""
    recs = [results.get(c) for c in check.cases()]
    if any(r is not None and "error" in r for r in recs):
        return "error"
    if any(r is None for r in recs):
        return None
    rec, other = recs[0], recs[1] if len(recs) > 1 else None
    if check.kind == "pct":
        return rec["pct_of_peak"]
    return other["median_ms"] / rec["median_ms"] if check.kind == "speedup" else rec["gbps"] / other["gbps"]


def verdict(point, results):
    """(PASS | MISS | ERROR | INCOMPLETE, worst measured check or None, its value, measured count).
    MISS: a measured check is under its bound; ERROR: none is, but a case failed; INCOMPLETE: some
    cases were not measured."""
    values = [(c, check_value(c, results)) for c in point.checks]
    measured = [(c, v) for c, v in values if v is not None and v != "error"]
    worst = min(measured, key=lambda cv: cv[1] / cv[0].bound, default=(None, None))
    if any(v < c.bound for c, v in measured):
        status = "MISS"
    elif any(v == "error" for _, v in values):
        status = "ERROR"
    else:
        status = "PASS" if len(measured) == len(values) else "INCOMPLETE"
    return status, worst[0], worst[1], len(measured)
