"""The warnings about a user's inputs: silent traps, inputs that run without error and give
garbage (images enlarged too far, an FP model near chance on the evaluation set, class folders
mapped by sorted name). Each check returns a warning that says what looks wrong and which
setting to check, or None. The pipeline shows them as they
are found (a ``warning`` progress event), and keeps them in the report and the job's metrics."""

from __future__ import annotations

from clcalib.config import Preprocess

MAX_UPSCALE = 2.0


def upscale_warning(pre: Preprocess, smallest_side: int | None) -> str | None:
    """preprocess.resize enlarging images more than MAX_UPSCALE times (a 28 px model given the
    ImageNet default resize 256 / crop 224 sees blurred 224 px images)."""
    if not pre.resize or not smallest_side or smallest_side >= 1 << 30:
        return None
    factor = pre.resize / smallest_side
    if factor <= MAX_UPSCALE:
        return None
    return (f"preprocess.resize={pre.resize} enlarges the images {factor:.1f}x (their shorter side is "
            f"{smallest_side} px); if the model was trained on images of that size, keep them as they are "
            "(CLI: --resize none --crop none; config: preprocess.resize and crop null)")


def chance_warning(fp_top1: float | None, num_classes: int) -> str | None:
    """The FP model itself near chance on the evaluation set: the data does not reach the model
    as it was trained (preprocessing, or a class-folder order that is not the model's)."""
    if fp_top1 is None or num_classes < 2:
        return None
    chance = 100.0 / num_classes
    if fp_top1 >= max(1.5 * chance, chance + 5.0):
        return None
    return (f"the FP model scores {fp_top1:.1f} % top-1 on the evaluation set, near chance ({chance:.1f} %): "
            "its inputs do not match its training. Check the preprocessing (resize, crop, mean, std) and "
            "the class folders' order (folders named by class need a labels file: --labels)")


def mapping_warning(mapping: dict[str, int], by_name: bool) -> str | None:
    """Folders named by class name, mapped in sorted order: right only if the model's classes
    happen to be in that order."""
    if not by_name:
        return None
    shown = ", ".join(f"{n}={i}" for n, i in sorted(mapping.items(), key=lambda kv: kv[1])[:6])
    more = ", ..." if len(mapping) > 6 else ""
    return (f"evaluation folders are class names, mapped to class indices in sorted order ({shown}{more}); "
            "if that is not the model's order, give a labels file with the names in index order (--labels)")
