"""A vectorised numpy ray caster for the synthetic scenes: colour, exact depth, instances, classes.

One primary ray per pixel centre, intersected analytically with the floor, the back wall and every
object; the nearest hit wins (a z-buffer over analytic surfaces). No anti-aliasing on purpose: the
RGB, depth, instance and class maps must agree pixel for pixel. Shading is Lambertian with one
directional light plus ambient light, a checkered floor for texture, and a sky above the wall
(where depth is invalid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perceptio.sources.synth.scene import COLOURS, SHAPES, Scene, SceneObject

# Class indices of the ADE20k-style label maps (0 = "other", unused by this world).
WALL_CLASS, FLOOR_CLASS, SKY_CLASS = 1, 2, 3
SHAPE_CLASS = {shape: 4 + index for index, shape in enumerate(SHAPES)}
# objectInfo150-style names (";"-separated synonyms) and whether a class is "stuff" (not a thing).
CLASS_NAMES = {
    WALL_CLASS: "wall",
    FLOOR_CLASS: "floor;flooring;ground",
    SKY_CLASS: "sky",
    SHAPE_CLASS["sphere"]: "sphere;ball",
    SHAPE_CLASS["cube"]: "cube;box",
    SHAPE_CLASS["cylinder"]: "cylinder;drum",
    SHAPE_CLASS["cone"]: "cone",
}
STUFF_CLASSES = (WALL_CLASS, FLOOR_CLASS, SKY_CLASS)

AMBIENT = 0.35
DIFFUSE = 0.65
SKY_TOP, SKY_HORIZON = np.array([0.45, 0.62, 0.90]), np.array([0.80, 0.88, 0.97])
FLOOR_DARK, FLOOR_LIGHT = 0.42, 0.58
SHADOW_DARKNESS = 0.45  # fraction of light a blob shadow takes away at its centre


@dataclass
class Rendering:
    rgb: np.ndarray  # uint8 (H, W, 3)
    depth_m: np.ndarray  # float64 (H, W) camera z in metres, 0 where nothing was hit (sky)
    instances: np.ndarray  # uint16 (H, W) object index + 1, 0 = floor, wall or sky
    classes: np.ndarray  # uint8 (H, W) ADE-style class index


def camera_rays(scene: Scene) -> np.ndarray:
    """(H*W, 3) ray directions through the pixel centres, scaled so that their camera-z is 1
    (then the ray parameter of a hit *is* its depth)."""
    camera = scene.camera
    cols = (np.arange(camera.width) + 0.5 - camera.cx) / camera.fx
    rows = (np.arange(camera.height) + 0.5 - camera.cy) / camera.fy
    grid_x, grid_y = np.meshgrid(cols, rows)
    camera_dirs = np.stack([grid_x.ravel(), grid_y.ravel(), np.ones(grid_x.size)], axis=1)
    return camera_dirs @ np.asarray(camera.rotation)


def _nearest_positive_root(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + 2 b t + c = 0 (inf where there is none), smaller first."""
    disc = b * b - a * c
    ok = (disc >= 0) & (np.abs(a) > 1e-12)
    root = np.sqrt(np.where(ok, disc, 0.0))
    safe_a = np.where(ok, a, 1.0)
    t1, t2 = (-b - root) / safe_a, (-b + root) / safe_a
    low, high = np.minimum(t1, t2), np.maximum(t1, t2)
    return np.where(ok, low, np.inf), np.where(ok, high, np.inf)


def _hit_sphere(origin: np.ndarray, dirs: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    centre = np.array(obj.centre)
    offset = origin - centre
    t, _ = _nearest_positive_root(
        (dirs * dirs).sum(1), dirs @ offset, np.full(len(dirs), offset @ offset - obj.size**2)
    )
    t = np.where(t > 0, t, np.inf)
    normals = (origin + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs - centre) / obj.size
    return t, normals


def _hit_cube(origin: np.ndarray, dirs: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(obj.yaw), np.sin(obj.yaw)
    # Columns: the cube's own axes in world coordinates (turned by yaw about the vertical).
    axes = np.array([[cos, 0.0, -sin], [0.0, 1.0, 0.0], [sin, 0.0, cos]]).T
    local_origin = (origin - np.array(obj.centre)) @ axes
    local_dirs = dirs @ axes
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / np.where(np.abs(local_dirs) < 1e-12, 1e-12, local_dirs)
        t1 = (-obj.size - local_origin) * inverse
        t2 = (obj.size - local_origin) * inverse
    entry, leave = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = entry.max(1), leave.min(1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    axis = entry.argmax(1)
    local_normals = np.zeros_like(local_dirs)
    local_normals[np.arange(len(dirs)), axis] = -np.sign(local_dirs[np.arange(len(dirs)), axis])
    return t, local_normals @ axes.T


def _hit_cylinder(origin: np.ndarray, dirs: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    ox, oz = origin[0] - obj.x, origin[2] - obj.z
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    side, _ = _nearest_positive_root(
        dx * dx + dz * dz, ox * dx + oz * dz, np.full(len(dirs), ox * ox + oz * oz - obj.size**2)
    )
    side_y = origin[1] + np.where(np.isfinite(side), side, 0.0) * dy
    side = np.where((side > 0) & (side_y >= obj.lift) & (side_y <= obj.top), side, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        # The top cap only: the bottom one faces the floor, and a floating object's is seen from above.
        cap = (obj.top - origin[1]) / np.where(np.abs(dy) < 1e-12, 1e-12, dy)
    cap_x, cap_z = ox + cap * dx, oz + cap * dz
    cap = np.where((cap > 0) & (cap_x * cap_x + cap_z * cap_z <= obj.size**2), cap, np.inf)
    t = np.minimum(side, cap)
    finite_t = np.where(np.isfinite(t), t, 0.0)
    normals = np.stack([ox + finite_t * dx, np.zeros(len(dirs)), oz + finite_t * dz], axis=1) / obj.size
    normals[cap < side] = (0.0, 1.0, 0.0)
    return t, normals


def _hit_cone(origin: np.ndarray, dirs: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    slope2 = (obj.size / obj.height) ** 2
    ox, oz, below_apex = origin[0] - obj.x, origin[2] - obj.z, obj.top - origin[1]
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dz * dz - slope2 * dy * dy
    b = ox * dx + oz * dz + slope2 * below_apex * dy
    c = np.full(len(dirs), ox * ox + oz * oz - slope2 * below_apex**2)
    best = np.full(len(dirs), np.inf)
    for root in _nearest_positive_root(a, b, c):
        y = origin[1] + np.where(np.isfinite(root), root, 0.0) * dy
        valid = (root > 0) & (y >= obj.lift) & (y <= obj.top)  # the lower nappe only
        best = np.where(valid & (root < best), root, best)
    finite_t = np.where(np.isfinite(best), best, 0.0)
    px, pz = ox + finite_t * dx, oz + finite_t * dz
    height_left = below_apex - finite_t * dy
    normals = np.stack([px, slope2 * height_left, pz], axis=1)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return best, normals


def _screen_footprint(scene: Scene, obj: SceneObject) -> np.ndarray:
    """Indices of the rays that can hit ``obj``: the pixels inside the projection of its bounding
    box (objects stand well in front of the camera, so every corner projects). Casting only
    those rays makes rendering several times faster."""
    camera = scene.camera
    reach = obj.footprint_radius
    corners = np.array(
        [[obj.x + dx, y, obj.z + dz] for dx in (-reach, reach) for dz in (-reach, reach) for y in (obj.lift, obj.top)]
    )
    in_camera = (corners - np.asarray(camera.position)) @ np.asarray(camera.rotation).T
    if (in_camera[:, 2] <= 1e-6).any():
        return np.arange(camera.width * camera.height)
    u = camera.fx * in_camera[:, 0] / in_camera[:, 2] + camera.cx
    v = camera.fy * in_camera[:, 1] / in_camera[:, 2] + camera.cy
    col0, col1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 1, camera.width)
    row0, row1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 1, camera.height)
    if col0 >= col1 or row0 >= row1:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(row0, row1)[:, None] * camera.width + np.arange(col0, col1)[None, :]).ravel()


def _blob_shadow(scene: Scene, floor_x: np.ndarray, floor_z: np.ndarray) -> np.ndarray:
    """Light left on the floor under soft blob shadows, one per object, pushed away from the light
    by the height of its centre: a cheap grounding cue (exact shadows would need a second ray cast)."""
    light = np.asarray(scene.light_direction)
    away = -light[[0, 2]] / light[1]
    light_left = np.ones_like(floor_x)
    for obj in scene.objects:
        centre_x, centre_z = np.array([obj.x, obj.z]) + away * obj.centre[1]
        radius = obj.footprint_radius * 1.2
        distance = np.hypot(floor_x - centre_x, floor_z - centre_z)
        darkness = SHADOW_DARKNESS * np.clip(1.6 - distance / radius, 0.0, 1.0)
        light_left = np.minimum(light_left, 1.0 - darkness)
    return light_left


_HIT = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder, "cone": _hit_cone}


def render(scene: Scene) -> Rendering:
    camera = scene.camera
    origin = np.asarray(camera.position, dtype=float)
    dirs = camera_rays(scene)
    count = len(dirs)
    light = np.asarray(scene.light_direction)

    with np.errstate(divide="ignore", invalid="ignore"):
        floor_t = np.where(dirs[:, 1] < 0, -origin[1] / dirs[:, 1], np.inf)
        wall_t = np.where(dirs[:, 2] > 0, (scene.wall_z - origin[2]) / dirs[:, 2], np.inf)
    wall_y = origin[1] + np.where(np.isfinite(wall_t), wall_t, 0.0) * dirs[:, 1]
    wall_t = np.where((wall_y >= 0) & (wall_y <= scene.wall_height), wall_t, np.inf)

    depth = np.minimum(floor_t, wall_t)
    classes = np.where(wall_t < floor_t, WALL_CLASS, FLOOR_CLASS).astype(np.uint8)
    classes[~np.isfinite(depth)] = SKY_CLASS
    # Lambert factor per pixel; the floor and the wall are flat, objects are shaded where hit.
    shade = np.where(classes == WALL_CLASS, -light[2], light[1])
    instances = np.zeros(count, dtype=np.uint16)
    for index, obj in enumerate(scene.objects):
        rays = _screen_footprint(scene, obj)
        t, obj_normals = _HIT[obj.shape](origin, dirs[rays], obj)
        nearer = t < depth[rays]
        hit = rays[nearer]
        depth[hit] = t[nearer]
        instances[hit] = index + 1
        classes[hit] = SHAPE_CLASS[obj.shape]
        shade[hit] = obj_normals[nearer] @ light
    shade = AMBIENT + DIFFUSE * np.clip(shade, 0.0, 1.0)

    # Albedo by lookup: rows 0-1 the floor's two tile tones, 2 the wall, 3 the sky, 4+ the objects.
    palette = np.array(
        [[FLOOR_DARK] * 3, [FLOOR_LIGHT] * 3, scene.wall_tint, SKY_HORIZON]
        + [COLOURS[obj.colour] for obj in scene.objects]
    )
    surface = np.where(instances > 0, instances.astype(np.int64) + 3, 2)
    floor = np.nonzero(classes == FLOOR_CLASS)[0]
    floor_x = origin[0] + depth[floor] * dirs[floor, 0]
    floor_z = origin[2] + depth[floor] * dirs[floor, 2]
    tiles = np.floor(floor_x / scene.floor_tile_m) + np.floor(floor_z / scene.floor_tile_m)
    surface[floor] = (tiles % 2).astype(np.int64)
    shade[floor] *= _blob_shadow(scene, floor_x, floor_z)
    colour = palette[surface] * shade[:, None]
    sky = np.nonzero(classes == SKY_CLASS)[0]
    row_fraction = (sky // camera.width / camera.height)[:, None]
    colour[sky] = SKY_TOP + (SKY_HORIZON - SKY_TOP) * row_fraction

    shape = (camera.height, camera.width)
    return Rendering(
        rgb=np.clip(colour * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(*shape, 3),
        depth_m=np.where(np.isfinite(depth), depth, 0.0).reshape(shape),
        instances=instances.reshape(shape),
        classes=classes.reshape(shape),
    )
