"""Binary masks to COCO polygons (the inverse of COCO's polygon rasteriser, up to simplification).

The outline of every 4-connected region is traced along pixel edges, so its vertices sit on pixel
corners (integer coordinates); pycocotools rasterises such a polygon back to exactly the same pixels.
The staircase outline is then simplified (Douglas-Peucker, sub-pixel tolerance) to a vertex count
like that of hand-drawn COCO polygons. Holes cannot be written as COCO polygons and are left out;
the world generator rejects scenes where that (or the simplification) costs too much overlap.
"""

from __future__ import annotations

import numpy as np

# Edge directions on the pixel-corner lattice (dx, dy), image coordinates (y grows downwards).
_LEFT_TURN = {(1, 0): (0, -1), (0, -1): (-1, 0), (-1, 0): (0, 1), (0, 1): (1, 0)}


def _boundary_edges(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Directed edges (x0, y0, x1, y1) between inside and outside pixels; the inside is on the
    left of the direction of travel as seen on screen, so outer outlines run counter-clockwise."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    edges: list[tuple[int, int, int, int]] = []
    # (neighbour offset, edge start corner, edge end corner) relative to pixel (row, col).
    for (dr, dc), (sx, sy), (ex, ey) in (
        ((-1, 0), (1, 0), (0, 0)),  # top edge, travelling left
        ((0, -1), (0, 0), (0, 1)),  # left edge, travelling down
        ((1, 0), (0, 1), (1, 1)),  # bottom edge, travelling right
        ((0, 1), (1, 1), (1, 0)),  # right edge, travelling up
    ):
        neighbour = padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        rows, cols = np.nonzero(inside & ~neighbour)
        edges.extend(zip((cols + sx).tolist(), (rows + sy).tolist(), (cols + ex).tolist(), (rows + ey).tolist()))
    return edges


def _trace_loops(edges: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int]]]:
    """Link directed edges into closed loops of corner points. Where two regions touch only at a
    corner, the walk turns left (towards its own inside) so that diagonal neighbours stay apart."""
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x0, y0, x1, y1 in edges:
        outgoing.setdefault((x0, y0), []).append((x1, y1))
    loops = []
    while outgoing:
        start = next(iter(outgoing))
        loop = [start]
        point = start
        direction = None
        while True:
            targets = outgoing[point]
            if len(targets) > 1 and direction is not None:
                turn = _LEFT_TURN[direction]
                nxt = next((t for t in targets if (t[0] - point[0], t[1] - point[1]) == turn), targets[0])
            else:
                nxt = targets[0]
            targets.remove(nxt)
            if not targets:
                del outgoing[point]
            direction = (nxt[0] - point[0], nxt[1] - point[1])
            point = nxt
            if point == start:
                break
            loop.append(point)
        loops.append(loop)
    return loops


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Simplify an open polyline, keeping both ends."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        start, end = points[first], points[last]
        segment = end - start
        between = points[first + 1 : last] - start
        length = np.hypot(*segment)
        if length == 0:
            distances = np.hypot(between[:, 0], between[:, 1])
        else:
            distances = np.abs(segment[0] * between[:, 1] - segment[1] * between[:, 0]) / length
        farthest = int(distances.argmax())
        if distances[farthest] > tolerance:
            split = first + 1 + farthest
            keep[split] = True
            stack.extend([(first, split), (split, last)])
    return points[keep]


def _simplify_loop(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed loop, cut at its first point and the point farthest from it."""
    far = int(np.hypot(*(points - points[0]).T).argmax())
    first = _douglas_peucker(points[: far + 1], tolerance)
    second = _douglas_peucker(np.vstack([points[far:], points[:1]]), tolerance)
    simplified = np.vstack([first[:-1], second[:-1]])
    return simplified if len(simplified) >= 3 else points


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.75, min_area: float = 4.0) -> list[list[float]]:
    """COCO polygon parts ``[[x1, y1, x2, y2, ...], ...]`` of the outer outlines of ``mask``,
    largest part first; parts smaller than ``min_area`` pixels are dropped."""
    parts = []
    for loop in _trace_loops(_boundary_edges(mask)):
        points = np.asarray(loop, dtype=float)
        area = -_signed_area(points)  # outer outlines run counter-clockwise on screen: negative
        if area < min_area:
            continue  # a hole (positive area) or a speck
        parts.append((area, _simplify_loop(points, tolerance)))
    parts.sort(key=lambda part: -part[0])
    return [[round(float(v), 2) for v in points.ravel()] for _, points in parts]
