"""Render a stable study into a small, ordered set of key images (pure: files in, PNG bytes out).

Selection uses only the index rows (:class:`InstanceInput`); pixels are decoded only for the
slices, frames or tiles that become key images.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from workers.render_config import RenderSettings

from .encode import fit, montage, png_bytes
from .errors import NothingRenderable, SeriesRenderError
from .geometry import (
    OrderedSlice,
    Ordering,
    distinct_positions,
    order_frames,
    order_instances,
    pick_representatives,
)
from .headers import read_header
from .model import WSI_SOP_CLASS, InstanceInput, KeyImage, RenderedStudy, SeriesDecision
from .pixels import CT_WINDOWS, Window, frame_dataset, modality_values, read_frames, to_display
from .rules import SeriesSummary, load_rules, select_series
from .wsi import assemble, choose_level, pyramid, tissue_mask, tissue_spots

logger = logging.getLogger(__name__)

#: Modalities whose multi-instance series are volumes (ordered in space).
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

#: Secondary Capture Image Storage classes (PS3.4 B.5), single- and multi-frame.
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

_HEAD = re.compile(
    r"HEAD|BRAIN|SKULL|CRANI|CEREBR|NEURO|ORBIT|SINUS|\bIAC\b|TEMPORAL", re.IGNORECASE
)
_CHEST = re.compile(r"CHEST|THORA|LUNG|PULM|\bCTPA\b|\bHRCT\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Context:
    settings: RenderSettings
    ct_windows: tuple[Window, ...] | None  # None: CT region unknown from headers
    #: (series, SOP Instance UID, reason) of instances that could not be used.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def ct_windows_for(instances: Sequence[InstanceInput]) -> tuple[Window, ...] | None:
    """CT windows for the study from Body Part Examined and Series Description (None: unknown).

    Head studies get brain + bone, chest studies soft tissue + lung, other known body parts soft
    tissue + bone. Unknown regions are decided from the pixels of the chosen slices instead.
    """
    texts = {f"{i.body_part} {i.series_description}" for i in instances if i.modality == "CT"}
    if any(_HEAD.search(t) for t in texts):
        return (CT_WINDOWS["brain"], CT_WINDOWS["bone"])
    if any(_CHEST.search(t) for t in texts):
        return (CT_WINDOWS["soft tissue"], CT_WINDOWS["lung"])
    if any(i.body_part for i in instances if i.modality == "CT"):
        return (CT_WINDOWS["soft tissue"], CT_WINDOWS["bone"])
    return None


#: What a CT series says it was reconstructed for, from its Convolution Kernel (0018,1210) or
#: Series Description: vendors' kernel names for lung and bone reconstructions (GE LUNG/BONE/
#: BONEPLUS; Siemens B70-B80, Bl (lung) and Br6x/H70 sharp kernels, I70 lung; Canon FC5x/FC8x lung,
#: FC30/FC35 bone; Philips YC/YD lung) and the words radiographers put in descriptions. Checked
#: before the body region: a lung reconstruction of an abdomen-and-chest study is still for lungs.
_LUNG_RECON = re.compile(r"LUNG|PULM|\bB[67]0|\bBL\d|\bI70|\bFC5[1-6]\b|\bFC8[36]\b|\bY[CD]\b", re.IGNORECASE)
_BONE_RECON = re.compile(r"BONE|\bB80|\bBR6[4-9]|\bH70|\bFC3[05]\b|OSSEOUS", re.IGNORECASE)


def ct_windows_for_reconstruction(summary: SeriesSummary, header: Dataset) -> tuple[Window, ...] | None:
    """Lung or bone windows first for a series reconstructed for them (kernel, description), the
    soft-tissue window after; None when the series does not say (the study's region decides)."""
    kernel = header.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):
        kernel = " ".join(str(k) for k in kernel)
    texts = [str(kernel or ""), summary.series_description, str(header.get("SeriesDescription", "") or "")]
    if any(_LUNG_RECON.search(t) for t in texts):
        return (CT_WINDOWS["lung"], CT_WINDOWS["soft tissue"])
    if any(_BONE_RECON.search(t) for t in texts):
        return (CT_WINDOWS["bone"], CT_WINDOWS["soft tissue"])
    return None


def ct_windows_from_pixels(hu: np.ndarray) -> tuple[Window, ...]:
    """Choose CT windows from a slice in HU: aerated lung inside the body -> lung; skull -> brain."""
    body = hu > -500
    if not body.any():
        return (CT_WINDOWS["soft tissue"], CT_WINDOWS["bone"])
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    inside = hu[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    lung = float(np.mean((inside > -950) & (inside < -500)))
    if lung > 0.10:
        return (CT_WINDOWS["soft tissue"], CT_WINDOWS["lung"])
    brain = float(np.mean((inside > 0) & (inside < 80)))
    bone = float(np.mean(inside > 700))
    if (
        bone > 0.03
        and brain > 0.3
        and inside.shape[0] * 0.6 < inside.shape[1] < inside.shape[0] * 1.6
    ):
        return (CT_WINDOWS["brain"], CT_WINDOWS["bone"])
    return (CT_WINDOWS["soft tissue"], CT_WINDOWS["bone"])


def _key_image(
    pixels: np.ndarray,
    *,
    settings: RenderSettings,
    instances: Sequence[InstanceInput],
    frames: Sequence[int],
    label: str,
    window: str | None,
) -> KeyImage:
    img = fit(pixels, settings.max_side)
    first = instances[0]
    return KeyImage.build(
        png=png_bytes(img),
        width=img.width,
        height=img.height,
        series_instance_uid=first.series_instance_uid,
        sop_instance_uids=tuple(dict.fromkeys(i.sop_instance_uid for i in instances)),
        sop_class_uid=first.sop_class_uid,
        frames=tuple(frames),
        label=label,
        window=window,
    )


def _decode(inst: InstanceInput, frames: Sequence[int]) -> tuple[Dataset, dict[int, np.ndarray]]:
    for f in frames:
        if not 0 <= f < inst.number_of_frames:
            raise SeriesRenderError(
                f"{inst.path.name}: frame {f + 1} outside 1..{inst.number_of_frames}"
            )
    ds, arrays = read_frames(inst.path, frames)
    missing = [f + 1 for f in frames if f not in arrays]
    if missing:
        raise SeriesRenderError(f"{inst.path.name}: frames {missing} not decoded")
    return ds, arrays


def _series_name(s: SeriesSummary) -> str:
    return s.modality or "image"


def _decode_reason(err: BaseException) -> str:
    return str(err) if isinstance(err, SeriesRenderError) else f"{type(err).__name__}: {err}"


def _skip(ctx: _Context, inst: InstanceInput, err: BaseException) -> str:
    """Record that ``inst`` could not be used (and why); the rest of its series goes on."""
    reason = _decode_reason(err)
    if not any(uid == inst.sop_instance_uid for _, uid, _ in ctx.skipped):
        ctx.skipped.append((inst.series_instance_uid, inst.sop_instance_uid, reason))
        logger.warning("instance skipped: %s", type(err).__name__)
    return reason


def _choose_and_decode(
    ordering: Ordering, ctx: _Context
) -> tuple[list[OrderedSlice], list[tuple[OrderedSlice, Dataset, np.ndarray]]]:
    """Pick representative slices among the instances that decode, and decode them.

    An instance that cannot be decoded (a damaged file, a codec the sender got wrong) is skipped
    with its reason recorded, and the picks are made again without it: one bad instance must not
    sink a series whose other instances decode.
    """
    settings = ctx.settings
    bad: dict[str, str] = {}
    cache: dict[tuple[str, tuple[int, ...]], tuple[Dataset, dict[int, np.ndarray]]] = {}
    while True:
        usable = [s for s in ordering.slices if s.instance.sop_instance_uid not in bad]
        if not usable:
            shown = "; ".join(f"{uid}: {why}" for uid, why in list(bad.items())[:3])
            raise SeriesRenderError(f"no instance of the series decodes ({len(bad)} tried): {shown}")
        slices = distinct_positions(usable)
        if len(slices) == 1 < len(usable):
            # every image at one location (dynamic or multi-echo series): spread over acquisition order
            slices = sorted(
                usable,
                key=lambda s: (s.instance.instance_number is None, s.instance.instance_number or 0,
                               s.instance.sop_instance_uid),
            )
        picks = pick_representatives([s.position for s in slices], settings.slices_per_volume)
        chosen: list[OrderedSlice] = [slices[i] for i in picks]
        by_instance: dict[str, list[OrderedSlice]] = defaultdict(list)
        for s in chosen:
            by_instance[s.instance.sop_instance_uid].append(s)
        failed = False
        for uid, group in by_instance.items():
            key = (uid, tuple(s.frame for s in group))
            if key in cache:
                continue
            try:
                cache[key] = _decode(group[0].instance, list(key[1]))
            except Exception as err:
                bad[uid] = _skip(ctx, group[0].instance, err)
                failed = True
                break
        if failed:
            continue
        decoded = []
        for s in chosen:
            group = by_instance[s.instance.sop_instance_uid]
            ds, arrays = cache[(s.instance.sop_instance_uid, tuple(g.frame for g in group))]
            decoded.append((s, ds, arrays[s.frame]))
        return slices, decoded


def _render_volume(ordering: Ordering, summary: SeriesSummary, ctx: _Context) -> list[KeyImage]:
    settings = ctx.settings
    slices, decoded = _choose_and_decode(ordering, ctx)
    chosen = [s for s, _, _ in decoded]
    is_ct = summary.modality == "CT" and settings.ct_window_presets
    windows: tuple[Window | None, ...] = (None,)
    if is_ct:
        mid_s, mid_ds, mid_arr = decoded[len(decoded) // 2]
        if mid_arr.ndim == 2:
            windows = ct_windows_for_reconstruction(summary, mid_ds) or ctx.ct_windows or ct_windows_from_pixels(
                np.asarray(
                    modality_values(mid_arr, frame_dataset(mid_ds, mid_s.frame)), dtype=np.float64
                )
            )
    name = f"{_series_name(summary)} {ordering.plane}".strip()
    images: list[KeyImage] = []
    tiles = []
    labels = []
    n = len(decoded)
    for k, (s, ds, arr) in enumerate(decoded, start=1):
        shown = to_display(arr, ds, s.frame, windows[0])
        where = f" at {s.position:.1f} mm" if s.position is not None else ""
        label = f"{name} slice {k}/{n}{where}"
        images.append(
            _key_image(
                shown.pixels,
                settings=settings,
                instances=[s.instance],
                frames=[s.frame + 1],
                label=label,
                window=shown.window,
            )
        )
        if settings.montage:
            tiles.append(fit(shown.pixels, settings.max_side))
            labels.append(f"{k}/{n}")
    if len(windows) > 1:
        s, ds, arr = decoded[len(decoded) // 2]
        k = len(decoded) // 2 + 1
        where = f" at {s.position:.1f} mm" if s.position is not None else ""
        for extra in windows[1:]:
            if extra is None:
                continue
            shown = to_display(arr, ds, s.frame, extra)
            images.append(
                _key_image(
                    shown.pixels,
                    settings=settings,
                    instances=[s.instance],
                    frames=[s.frame + 1],
                    label=f"{name} slice {k}/{n}{where}, {extra.name} window",
                    window=shown.window,
                )
            )
    if settings.montage and n > 1:
        sheet = montage(tiles, labels, settings.max_side)
        images.insert(
            0,
            KeyImage.build(
                png=png_bytes(sheet),
                width=sheet.width,
                height=sheet.height,
                series_instance_uid=summary.series_instance_uid,
                sop_instance_uids=tuple(dict.fromkeys(s.instance.sop_instance_uid for s in chosen)),
                sop_class_uid=chosen[0].instance.sop_class_uid,
                frames=tuple(s.frame + 1 for s in chosen),
                label=f"{name} montage of {n} slices",
                window=images[0].window,
            ),
        )
    logger.debug("volume series: %d slices, ordered by %s", len(slices), ordering.method)
    return images


def _render_frames(
    inst: InstanceInput, summary: SeriesSummary, ctx: _Context, what: str
) -> list[KeyImage]:
    """Representative frames of a cine or temporal multi-frame instance (evenly spread in time)."""
    settings = ctx.settings
    picks = pick_representatives([None] * inst.number_of_frames, settings.frames_per_cine)
    ds, arrays = _decode(inst, picks)
    images = []
    for f in picks:
        shown = to_display(arrays[f], ds, f)
        images.append(
            _key_image(
                shown.pixels,
                settings=settings,
                instances=[inst],
                frames=[f + 1],
                label=f"{_series_name(summary)} {what}frame {f + 1}/{inst.number_of_frames}",
                window=shown.window,
            )
        )
    return images


def _render_single(
    inst: InstanceInput, summary: SeriesSummary, ctx: _Context, view: int, views: int
) -> KeyImage:
    ds, arrays = _decode(inst, [0])
    shown = to_display(arrays[0], ds, 0)
    what = summary.series_description or summary.body_part.lower()
    if not what:
        what = "secondary capture" if inst.sop_class_uid.startswith(_SC_PREFIX) else "image"
    suffix = f" view {view}/{views}" if views > 1 else ""
    return _key_image(
        shown.pixels,
        settings=ctx.settings,
        instances=[inst],
        frames=[1],
        label=f"{_series_name(summary)} {what}{suffix}".strip(),
        window=shown.window,
    )


def _render_wsi(
    instances: Sequence[InstanceInput], summary: SeriesSummary, ctx: _Context
) -> list[KeyImage]:
    settings = ctx.settings
    levels = pyramid(instances)
    overview_level = choose_level(levels, settings.max_side)
    overview, frames = assemble(
        overview_level, 0, 0, overview_level.total_rows, overview_level.total_cols
    )
    images = [
        _key_image(
            overview,
            settings=settings,
            instances=[overview_level.instance],
            frames=frames,
            label=(
                f"slide overview ({overview_level.total_cols}x{overview_level.total_rows} px level "
                f"of {len(levels)})"
            ),
            window=None,
        )
    ]
    top = levels[0]
    patch = settings.max_side
    if settings.wsi_patches <= 0 or top.longest < 2 * patch:
        return images
    mask = tissue_mask(overview)
    scale_r = top.total_rows / overview_level.total_rows
    scale_c = top.total_cols / overview_level.total_cols
    box_r = max(1, round(patch / scale_r))
    box_c = max(1, round(patch / scale_c))
    for n, (r, c) in enumerate(tissue_spots(mask, box_r, box_c, settings.wsi_patches), start=1):
        row0 = min(max(0, round(r * scale_r)), max(0, top.total_rows - patch))
        col0 = min(max(0, round(c * scale_c)), max(0, top.total_cols - patch))
        region, used = assemble(
            top, row0, col0, min(patch, top.total_rows), min(patch, top.total_cols)
        )
        images.append(
            _key_image(
                region,
                settings=settings,
                instances=[top.instance],
                frames=used,
                label=f"high-magnification patch {n} at x={col0}, y={row0} of the {top.total_cols}x{top.total_rows} px level",
                window=None,
            )
        )
    return images


def _render_series(
    instances: Sequence[InstanceInput], summary: SeriesSummary, ctx: _Context
) -> list[KeyImage]:
    """Key images of one series, by kind: slide, volume, cine/temporal frames, or single views."""
    settings = ctx.settings
    if WSI_SOP_CLASS in summary.sop_classes:
        return _render_wsi([i for i in instances if i.sop_class_uid == WSI_SOP_CLASS], summary, ctx)
    images_only = [i for i in instances if i.is_image]
    if not images_only:
        raise SeriesRenderError("no instance of the series declares an image matrix")
    multi = [i for i in images_only if i.number_of_frames > 1]
    single = [i for i in images_only if i.number_of_frames == 1]
    if len(single) >= len(multi):
        if summary.modality in VOLUME_MODALITIES and (len(single) > 1 or summary.modality == "CT"):
            # a lone CT slice still gets the study's CT windows; other lone images show as they are
            return _render_volume(order_instances(single), summary, ctx)
        ordered = sorted(
            single,
            key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid),
        )
        ordered = ordered[: settings.views_per_series]
        views: list[KeyImage] = []
        reasons: list[str] = []
        for n, i in enumerate(ordered, start=1):
            try:
                views.append(_render_single(i, summary, ctx, n, len(ordered)))
            except Exception as err:
                reasons.append(_skip(ctx, i, err))
        if not views:
            raise SeriesRenderError(f"no instance of the series decodes: {'; '.join(reasons[:3])}")
        return views
    images: list[KeyImage] = []
    clips = sorted(
        multi, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid)
    )
    clip_reasons: list[str] = []
    for inst in clips[: settings.views_per_series]:
        try:
            images.extend(_render_clip(inst, summary, ctx))
        except Exception as err:
            clip_reasons.append(_skip(ctx, inst, err))
    if not images:
        raise SeriesRenderError(f"no instance of the series decodes: {'; '.join(clip_reasons[:3])}")
    return images


def _render_clip(inst: InstanceInput, summary: SeriesSummary, ctx: _Context) -> list[KeyImage]:
    """Key images of one multi-frame instance: a volume (enhanced objects) or its frames."""
    ordering: Ordering | None = None
    if summary.modality in VOLUME_MODALITIES:
        try:
            header = read_header(inst.path)
        except ValueError as err:
            raise SeriesRenderError(f"{inst.path.name}: {err}") from err
        if "PerFrameFunctionalGroupsSequence" in header:
            ordering = order_frames(header, inst)
    if ordering is not None:
        return _render_volume(ordering, summary, ctx)
    what = "cine " if summary.modality in ("US", "XA", "XRF", "NM", "ES") else ""
    return _render_frames(inst, summary, ctx, what)


def _content_order(inst: InstanceInput) -> tuple[bool, int, str, bool, int, str]:
    return (inst.series_number is None, inst.series_number or 0, inst.series_instance_uid,
            inst.instance_number is None, inst.instance_number or 0, inst.sop_instance_uid)


def _group(instances: Sequence[InstanceInput]) -> dict[str, list[InstanceInput]]:
    """Instances by series, in an order that depends on the study's content alone (Series and
    Instance Number, then UIDs): never on the order in which they arrived or were listed, so the
    same study always gives the same selection, key images and provenance."""
    groups: dict[str, list[InstanceInput]] = {}
    for inst in sorted(instances, key=_content_order):
        groups.setdefault(inst.series_instance_uid, []).append(inst)
    return groups


def render_study(instances: Sequence[InstanceInput], settings: RenderSettings) -> RenderedStudy:
    """Choose series by the rules, render each chosen series, and record every decision.

    A series that fails to render is listed in ``failures`` with its reason and the next candidate
    takes its place; :class:`NothingRenderable` is raised when no key image results.
    """
    rules = load_rules(settings.rules_file)
    groups = _group(instances)
    summaries = {uid: SeriesSummary.of(group) for uid, group in groups.items()}
    selection = select_series(list(summaries.values()), rules)
    decisions = dict(selection.decisions)
    result = RenderedStudy()
    ctx = _Context(settings=settings, ct_windows=ct_windows_for(instances))
    rendered = 0
    for rank, summary in enumerate(selection.candidates, start=1):
        uid = summary.series_instance_uid
        why = selection.reasons[uid]
        if rendered >= settings.max_series or len(result.key_images) >= settings.max_key_images:
            decisions[uid] = SeriesDecision(
                uid,
                False,
                f"not chosen: {why}, but ranked {rank} after {rendered} rendered series "
                f"(max_series={settings.max_series}, max_key_images={settings.max_key_images})",
            )
            continue
        try:
            images = _render_series(groups[uid], summary, ctx)
        except Exception as err:
            reason = (
                str(err) if isinstance(err, SeriesRenderError) else f"{type(err).__name__}: {err}"
            )
            logger.warning("series rendering failed (%s)", type(err).__name__)
            result.failures.append((uid, reason))
            decisions[uid] = SeriesDecision(
                uid, True, f"chosen by {why}, but rendering failed: {reason}"
            )
            continue
        budget = settings.max_key_images - len(result.key_images)
        result.key_images.extend(images[:budget])
        rendered += 1
        detail = "ORIGINAL/PRIMARY, " if summary.original_primary else ""
        decisions[uid] = SeriesDecision(
            uid,
            True,
            f"chosen by {why}; rank {rank} ({detail}{summary.number_of_images} instance(s), "
            f"{len(images[:budget])} key image(s))",
        )
    result.skipped = list(ctx.skipped)
    failed = {uid for uid, _ in result.failures}
    for series_uid, sop_uid, why in ctx.skipped:
        d = decisions.get(series_uid)
        if d is not None and series_uid not in failed:
            decisions[series_uid] = SeriesDecision(series_uid, d.chosen, f"{d.reason}; instance {sop_uid} skipped: {why}")
    result.decisions = [decisions[uid] for uid in groups]
    logger.info(
        "rendered %d key images from %d of %d series (%d failures)",
        len(result.key_images),
        rendered,
        len(groups),
        len(result.failures),
    )
    if not result.key_images:
        lines = [f"{d.series_instance_uid}: {d.reason}" for d in result.decisions] or [
            "no instances"
        ]
        raise NothingRenderable("nothing renderable in the study: " + "; ".join(lines), rendered=result)
    return result
