"""What a detection found, in the words a person would use: the summary's clauses and the
``differences`` list ("a band 74 px high was added at the top of B; everything below moved
down by 74 px; 1 region changed at x=501, y=383")."""

from __future__ import annotations

from handler.detect import Detection
from handler.result import AlignmentInfo, BandInfo, Difference, Region

#: How each kind of region is reported (``Difference.aspect``).
ASPECTS = {"changed": "content", "added": "presence", "removed": "presence", "moved": "position"}


def clauses(detection: Detection) -> list[str]:
    """The alignment's bands and offset, then the other regions by kind, as summary clauses."""
    alignment = detection.alignment
    out = alignment_clauses(alignment) if alignment else []
    said = {band.region for band in alignment.bands} if alignment else set()
    rest = [region for index, region in enumerate(detection.regions) if index not in said]
    changed = "changed in transparency only" if detection.transparency_only else "changed"
    for kind, verb in (
        ("changed", changed),
        ("moved", "moved"),
        ("added", "added in B"),
        ("removed", "removed from A"),
    ):
        chosen = [region for region in rest if region.kind == kind]
        if chosen:
            out.append(_count(chosen, verb))
    return out


def alignment_clauses(alignment: AlignmentInfo) -> list[str]:
    """ "a band 74 px high was added at the top of B; everything below moved down by 74 px",
    or for a picture that moved as a whole "everything moved left by 6 px and up by 4 px"."""
    out: list[str] = []
    bands = alignment.bands
    for index, band in enumerate(bands):
        if band.kind == "matched" or band.region is None:
            continue
        out.append(_band(band, index == 0, index == len(bands) - 1))
        after = next((b for b in bands[index + 1 :] if b.kind == "matched"), None)
        if after is not None and after.shift:
            out.append(f"everything below moved {_vertical(after.shift)}")
    dx, dy = alignment.offset
    moves = [f"{'right' if dx > 0 else 'left'} by {abs(dx)} px"] if dx else []
    if dy and not out:  # (no band said it: the picture moved down or up as a whole)
        moves.append(_vertical(dy))
    if moves:
        out.append("everything moved " + " and ".join(moves))
    return out


def differences(detection: Detection) -> list[Difference]:
    """One difference per region (its kind, where it is in A and in B)."""
    found = []
    transparency = detection.transparency_only
    for index, region in enumerate(detection.regions):
        pixels = detection.region_pixels[index] if index < len(detection.region_pixels) else 0
        aspect = (
            "transparency" if transparency and region.kind == "changed" else ASPECTS[region.kind]
        )
        found.append(
            Difference(
                aspect=aspect,
                element=f"{region.kind} region",
                description=_described(region, pixels),
                region=index,
            )
        )
    return found


def _described(region: Region, pixels: int) -> str:
    where = f"x={region.x}, y={region.y}, {region.width}x{region.height} px"
    if region.kind == "added":
        return f"Added in B at {where}."
    if region.kind == "removed":
        return f"Removed from A at {where}."
    if region.kind == "moved" and region.shift is not None and region.b is not None:
        dx, dy = region.shift
        return (
            f"Moved by ({dx}, {dy}) px: from {where} in A to x={region.b.x}, y={region.b.y} in B."
        )
    return f"Changed area at {where} ({pixels} changed pixels)."


def _band(band: BandInfo, first: bool, last: bool) -> str:
    rows = band.b if band.kind == "inserted" else band.a
    assert rows is not None
    height = rows[1] - rows[0]
    which, verb = ("B", "added") if band.kind == "inserted" else ("A", "removed")
    where = "at the top" if first else "at the bottom" if last else f"at y={rows[0]}"
    return f"a band {height} px high was {verb} {where} of {which}"


def _vertical(shift: int) -> str:
    return f"{'down' if shift > 0 else 'up'} by {abs(shift)} px"


def _count(regions: list[Region], verb: str) -> str:
    if len(regions) == 1:
        region = regions[0]
        return f"1 region {verb} at x={region.x}, y={region.y}"
    return f"{len(regions)} regions {verb}"
