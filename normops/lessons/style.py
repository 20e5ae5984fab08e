"""Lesson ``style``: InstanceNorm removes each image's contrast and brightness, channel by channel.

A "style" here is what a per-channel gain and offset does to an image: y_c = a_c * x + b_c
(contrast a, brightness b, a color cast when they differ between channels). InstanceNorm
normalizes each (image, channel) over its pixels, so for a_c > 0

    IN(a x + b) = (a x + b - (a mu + b)) / sqrt(a^2 var + eps) = (x - mu) / sqrt(var + eps / a^2)

which is IN(x) up to eps: every style of an image gives the same output. LayerNorm over (C, H, W)
removes only one gain and offset for the whole image, BatchNorm only the batch's. An affine
InstanceNorm whose weight and bias are another image's per-channel std and mean puts that
image's style back (AdaIN, the core of arbitrary style transfer).
"""
import torch

from ._common import digits, figure, fmt, functional, header, lesson, max_diff, modules, save

NAME = "style"
DESCRIPTION = "InstanceNorm removes per-image contrast and brightness (style): the same output for every style"

K = 6  # images in the batch
# style name -> (per-channel gain, per-channel offset) for the 3 channels, on raw 0..16 pixel counts
STYLES = {
    "original": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "low contrast": ((0.5, 0.5, 0.5), (0.0, 0.0, 0.0)),
    "bright + contrast": ((3.0, 3.0, 3.0), (20.0, 20.0, 20.0)),
    "color cast": ((1.5, 0.7, 1.0), (5.0, -3.0, 10.0)),
    "dark + warm": ((0.8, 0.6, 0.5), (-8.0, -10.0, -12.0)),
}
EPS = 1e-5


def stylize(x, style):
    """[N, 3, H, W] from [N, 1, H, W]: channel c = gain[c] * x + offset[c]."""
    gain, offset = (torch.tensor(v).view(1, 3, 1, 1) for v in STYLES[style])
    return gain * x + offset


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    ns, F = modules(norm), functional(norm)
    x = digits(seed)[2][:K] * 16.0  # test digits as raw pixel counts 0..16 (var ~ 30: eps is negligible)
    inorm = ns.InstanceNorm2d(3, eps=EPS)
    lnorm = ns.LayerNorm([3, 8, 8], eps=EPS, elementwise_affine=False)
    bnorm = ns.BatchNorm2d(3, eps=EPS, affine=False).train()
    print(f"{K} digits as 3-channel images (raw pixel counts 0..16), restyled per channel as gain * x + offset; "
          f"norms from {norm}")
    print(f"\n{'style':<24} {'gain':<17} {'offset':<20} {'image 0 channel means':<26} channel stds")
    styled = {s: stylize(x, s) for s in STYLES}
    for s, v in styled.items():
        print(f"{s:<24} {str(STYLES[s][0]):<17} {str(STYLES[s][1]):<20} {fmt(v[0].mean((1, 2)), '.2f'):<26} "
              f"{fmt(v[0].std((1, 2)), '.2f')}")

    base = styled["original"]
    diffs = {"instance": {}, "layer": {}, "batch": {}}
    with torch.no_grad():
        ref = {"instance": inorm(base), "layer": lnorm(base), "batch": bnorm(base)}
        for s, v in list(styled.items())[1:]:
            diffs["instance"][s] = max_diff(inorm(v), ref["instance"])
            diffs["layer"][s] = max_diff(lnorm(v), ref["layer"])
            mixed = base.clone()
            mixed[0] = v[0]  # only image 0 restyled, the batch otherwise the same
            diffs["batch"][s] = max_diff(bnorm(mixed)[0], ref["batch"][0])
        out = inorm(styled["color cast"])
    print(f"\nmax |output(style) - output(original)| over all {K} images (BatchNorm: image 0 restyled in its batch)")
    print(f"{'style':<24} {'InstanceNorm2d':>15} {'LayerNorm[C,H,W]':>17} {'BatchNorm2d':>12}")
    for s in list(STYLES)[1:]:
        print(f"{s:<24} {diffs['instance'][s]:>15.2e} {diffs['layer'][s]:>17.2e} {diffs['batch'][s]:>12.2e}")
    worst = {k: max(v.values()) for k, v in diffs.items()}
    min_var = min(float(v.var((2, 3), correction=0).min()) for v in styled.values())
    print(f"InstanceNorm2d agrees to {worst['instance']:.1e} across every style: the only difference is eps / gain^2 "
          f"next to a per-channel variance of at least {min_var:.2f}, and float32 rounding")
    out_std = out.std((2, 3), correction=0)
    print(f"after InstanceNorm2d every (image, channel) has mean {float(out.mean((2, 3)).abs().max()):.1e} (max |.|) "
          f"and std {float(out_std.min()):.4f} to {float(out_std.max()):.4f}")
    uniform = [s for s in list(STYLES)[1:] if len(set(STYLES[s][0])) == 1 and len(set(STYLES[s][1])) == 1]
    per_channel = [s for s in list(STYLES)[1:] if s not in uniform]
    print(f"LayerNorm[C,H,W] normalizes once per image: max |diff| {max(diffs['layer'][s] for s in uniform):.1e} for "
          f"the styles with one gain and offset for all channels ({', '.join(uniform)}), "
          f"{max(diffs['layer'][s] for s in per_channel):.3f} for those that differ by channel "
          f"({', '.join(per_channel)})")
    print(f"BatchNorm2d normalizes by the batch's statistics, not the image's: max |diff| {worst['batch']:.3f}")

    # AdaIN: the content of image 0 with the style of image 1 under "color cast"
    content, style_img = base[:1], styled["color cast"][1:2]
    mu, sd = style_img.mean((2, 3))[0], style_img.std((2, 3), correction=0)[0]
    with torch.no_grad():
        adain = F.instance_norm(content, weight=sd, bias=mu, eps=EPS)
    adain_mean_err = max_diff(adain.mean((2, 3))[0], mu)
    adain_std_err = max_diff(adain.std((2, 3), correction=0)[0], sd)
    print(f"\nAdaIN: instance_norm(content, weight = style's channel stds {fmt(sd, '.2f')}, bias = its means "
          f"{fmt(mu, '.2f')}) has the style's means to {adain_mean_err:.1e} and stds to {adain_std_err:.1e}")

    fig = figure(figsize=(2 * len(STYLES), 6.6))
    axes = fig.subplots(3, len(STYLES), squeeze=False)
    lo, hi = min(float(v[0].min()) for v in styled.values()), max(float(v[0].max()) for v in styled.values())
    with torch.no_grad():
        for j, (s, v) in enumerate(styled.items()):
            img = ((v[0] - lo) / (hi - lo)).permute(1, 2, 0).clamp(0, 1)  # one scale for every style
            axes[0, j].imshow(img.numpy(), interpolation="nearest")
            axes[0, j].set_title(s, fontsize=8)
            for i, (module, kind, label) in enumerate(((inorm, "instance", "InstanceNorm2d"),
                                                       (lnorm, "layer", "LayerNorm"))):
                normed = ((module(v)[0] + 3) / 6).permute(1, 2, 0).clamp(0, 1)  # [-3, 3] -> [0, 1]
                axes[i + 1, j].imshow(normed.numpy(), interpolation="nearest")
                diff = "reference" if s not in diffs[kind] else f"diff {diffs[kind][s]:.1g}"
                axes[i + 1, j].set_title(f"{label} ({diff})", fontsize=8)
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"top: image 0 in each style (gain * x + offset per channel); below: after each norm, drawn on "
                 f"[-3, 3]\ndiff: max |output(style) - output(original)| over the {K} images (0: the same output)",
                 fontsize=9)
    path = save(fig, out_dir, NAME)
    return {"instance_max_diff": worst["instance"], "layer_max_diff": diffs["layer"], "batch_max_diff": diffs["batch"],
            "uniform_styles": uniform, "per_channel_styles": per_channel,
            "instance_diffs": diffs["instance"], "min_channel_var": min_var,
            "instance_out_mean_max_abs": float(out.mean((2, 3)).abs().max()),
            "adain_mean_err": adain_mean_err, "adain_std_err": adain_std_err, "plot": path}
