"""Procedural scenes of the synthetic world: a camera, a floor, a back wall and 3-7 solid objects.

World frame: metres, x to the right, y up, z away from the default camera; the floor is the plane
y = 0 and the back wall the plane z = ``wall_z``. Most objects stand on the floor; some float above
it (``lift``), so that "the object reaching lowest in the image is nearest" is not always right.
Object sizes span a wide range (a scale drawn log-uniformly per object), from toys near the camera to
giants near the wall, so that how big an object looks does not tell how near it is. A scene is a pure
function of the random generator it is given, and :func:`image_rng` derives that generator from the
world seed and the image index alone, so any image can be rebuilt without the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("sphere", "cube", "cylinder", "cone")
# The "person-like" category of this world: RefCOCO's testA holds people, testB other objects.
TEST_A_SHAPE = "sphere"

# Named colours (linear-ish RGB in [0, 1]); names are what the referring expressions say.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.50, 0.72),
    "cyan": (0.10, 0.80, 0.85),
    "white": (0.93, 0.93, 0.93),
    "brown": (0.50, 0.30, 0.12),
}

# Gap kept between the footprints of two objects, so that none intersects another in 3-D.
FOOTPRINT_GAP_M = 0.12
# Two objects of one shape differ in volume by at least this factor ("distinct sizes").
MIN_VOLUME_RATIO = 1.2
# A floating object's bottom stays this far below the camera, which then never sees it from below.
CAMERA_BOTTOM_CLEARANCE_M = 0.2


@dataclass(frozen=True)
class SceneConfig:
    """Ranges the scene sampler draws from (metres and degrees)."""

    width: int = 384
    height: int = 288
    min_objects: int = 3
    max_objects: int = 7
    camera_height_m: tuple[float, float] = (1.2, 1.8)
    camera_pitch_deg: tuple[float, float] = (-20.0, -9.0)
    camera_yaw_deg: tuple[float, float] = (-8.0, 8.0)
    horizontal_fov_deg: tuple[float, float] = (55.0, 70.0)
    wall_distance_m: tuple[float, float] = (10.0, 13.0)
    wall_height_m: tuple[float, float] = (3.5, 6.0)
    object_distance_m: tuple[float, float] = (2.6, 8.5)
    # Every object's dimensions are its shape's base ranges times a scale drawn log-uniformly from
    # this range: the apparent size then varies more with the object than with its distance.
    object_scale: tuple[float, float] = (0.35, 2.6)
    lifted_fraction: float = 0.5  # share of objects that float above the floor ...
    lift_m: tuple[float, float] = (0.3, 1.2)  # ... by this much (the bottom's height)
    wall_clearance_m: float = 0.4  # objects end at least this far in front of the wall
    # Smallest visible area of an object, as a fraction of the image (0.003 = 330 px at 384x288).
    min_visible_fraction: float = 0.003


@dataclass(frozen=True)
class Camera:
    """Pinhole camera. ``rotation`` rows are the camera axes (right, down, forward) in world
    coordinates (OpenCV convention), so a world point X has camera coordinates
    ``rotation @ (X - position)`` and image coordinates ``(fx * x / z + cx, fy * y / z + cy)``
    where pixel (col, row) covers [col, col + 1) x [row, row + 1). Depth is camera z."""

    position: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    yaw_deg: float
    pitch_deg: float

    def to_camera(self, point: np.ndarray) -> np.ndarray:
        return np.asarray(self.rotation) @ (np.asarray(point, dtype=float) - np.asarray(self.position))

    def project(self, point: np.ndarray) -> tuple[float, float, float]:
        """(u, v, depth) of a world point."""
        x, y, z = self.to_camera(point)
        return (self.fx * x / z + self.cx, self.fy * y / z + self.cy, float(z))


@dataclass(frozen=True)
class SceneObject:
    """One solid above the floor. ``size`` is the sphere/cylinder/cone radius or the cube's half
    edge; ``height`` is the cylinder/cone height (the sphere's and cube's follow from size); ``lift``
    is the height of its bottom above the floor (0 = standing on it)."""

    shape: str
    colour: str
    x: float
    z: float
    size: float
    height: float
    yaw: float = 0.0  # cubes only: rotation about the vertical axis, radians
    lift: float = 0.0

    @property
    def extent(self) -> float:
        """The object's own height."""
        return {"sphere": 2 * self.size, "cube": 2 * self.size}.get(self.shape, self.height)

    @property
    def top(self) -> float:
        """Height of the object's top above the floor."""
        return self.lift + self.extent

    @property
    def centre(self) -> tuple[float, float, float]:
        """Middle of the object's vertical extent, above its footprint centre."""
        return (self.x, self.lift + self.extent / 2, self.z)

    @property
    def footprint_radius(self) -> float:
        return self.size * math.sqrt(2) if self.shape == "cube" else self.size

    @property
    def volume(self) -> float:
        if self.shape == "sphere":
            return 4 / 3 * math.pi * self.size**3
        if self.shape == "cube":
            return (2 * self.size) ** 3
        if self.shape == "cylinder":
            return math.pi * self.size**2 * self.height
        return math.pi * self.size**2 * self.height / 3


@dataclass(frozen=True)
class Scene:
    camera: Camera
    objects: tuple[SceneObject, ...]
    wall_z: float
    wall_height: float
    wall_tint: tuple[float, float, float]
    light_direction: tuple[float, float, float]  # unit vector towards the light
    floor_tile_m: float


def image_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of image ``index`` (``stream`` separates scene sampling from wording)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def sample_camera(rng: np.random.Generator, config: SceneConfig) -> Camera:
    yaw_deg = _uniform(rng, config.camera_yaw_deg)
    pitch_deg = _uniform(rng, config.camera_pitch_deg)
    fov = math.radians(_uniform(rng, config.horizontal_fov_deg))
    position = (_uniform(rng, (-0.3, 0.3)), _uniform(rng, config.camera_height_m), 0.0)
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    down = np.cross(right, forward)  # image rows grow downwards
    focal = (config.width / 2) / math.tan(fov / 2)
    return Camera(
        position=position,
        rotation=tuple(tuple(float(v) for v in axis) for axis in (right, down, forward)),
        fx=focal,
        fy=focal,
        cx=config.width / 2,
        cy=config.height / 2,
        width=config.width,
        height=config.height,
        yaw_deg=yaw_deg,
        pitch_deg=pitch_deg,
    )


def sample_shapes(rng: np.random.Generator, count: int) -> list[str]:
    """Random shapes with at least one sphere (testA material), one other shape (testB material)
    and one shape used twice (so that some objects can only be told apart by where they are or
    how big they are, as in RefCOCO, where every image has several objects of one category)."""
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=count)]
    shapes[0] = TEST_A_SHAPE
    if all(shape == TEST_A_SHAPE for shape in shapes):
        shapes[1] = SHAPES[int(rng.integers(1, len(SHAPES)))]
    if len(set(shapes)) == len(shapes):
        shapes[-1] = shapes[0]
    return shapes


def composition_ok(objects: tuple[SceneObject, ...] | list[SceneObject], config: SceneConfig) -> bool:
    """The promises of :func:`sample_shapes` hold for these objects (used after hidden objects
    were dropped from a scene)."""
    shapes = [obj.shape for obj in objects]
    return (
        config.min_objects <= len(shapes) <= config.max_objects
        and TEST_A_SHAPE in shapes
        and any(shape != TEST_A_SHAPE for shape in shapes)
        and len(set(shapes)) < len(shapes)
    )


def _sample_size(rng: np.random.Generator, shape: str, config: SceneConfig) -> tuple[float, float]:
    """(size, height) of one object: its shape's base ranges times a log-uniform scale."""
    low, high = config.object_scale
    scale = math.exp(_uniform(rng, (math.log(low), math.log(high))))
    if shape == "sphere":
        return scale * _uniform(rng, (0.22, 0.75)), 0.0
    if shape == "cube":
        return scale * _uniform(rng, (0.22, 0.65)), 0.0
    if shape == "cylinder":
        return scale * _uniform(rng, (0.18, 0.5)), scale * _uniform(rng, (0.5, 1.7))
    return scale * _uniform(rng, (0.25, 0.6)), scale * _uniform(rng, (0.6, 1.7))


def _sizes_distinct(objects: list[SceneObject], candidate: SceneObject) -> bool:
    for other in objects:
        if other.shape == candidate.shape:
            ratio = max(other.volume, candidate.volume) / min(other.volume, candidate.volume)
            if ratio < MIN_VOLUME_RATIO:
                return False
    return True


def _footprints_clear(objects: list[SceneObject], candidate: SceneObject) -> bool:
    for other in objects:
        distance = math.hypot(other.x - candidate.x, other.z - candidate.z)
        if distance < other.footprint_radius + candidate.footprint_radius + FOOTPRINT_GAP_M:
            return False
    return True


def _fits(candidate: SceneObject, camera: Camera, wall_z: float, config: SceneConfig) -> bool:
    """In front of the wall, clear of the camera, and never seen from below."""
    reach = candidate.footprint_radius
    in_front = candidate.z + reach <= wall_z - config.wall_clearance_m
    # The footprint stays 1 m clear of the camera, so no object fills or swallows the view.
    clear = math.hypot(candidate.x - camera.position[0], candidate.z - camera.position[2]) - reach >= 1.0
    # The renderer draws no bottom faces (cones and cylinders would show a hole): keep every
    # bottom below the eye.
    return in_front and clear and candidate.lift <= camera.position[1] - CAMERA_BOTTOM_CLEARANCE_M


def sample_scene(rng: np.random.Generator, config: SceneConfig) -> Scene | None:
    """One scene, or None when its objects could not all be placed apart. Objects may still be
    hidden behind each other: the caller renders the scene and checks what is visible."""
    camera = sample_camera(rng, config)
    wall_z = _uniform(rng, config.wall_distance_m)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = sample_shapes(rng, count)
    colour_names = list(COLOURS)
    colours = [colour_names[i] for i in rng.permutation(len(colour_names))[:count]]
    half_fov_tan = camera.cx / camera.fx
    yaw = math.radians(camera.yaw_deg)
    objects: list[SceneObject] = []
    for shape, colour in zip(shapes, colours):
        for _ in range(60):
            size, height = _sample_size(rng, shape, config)
            # Place in the camera's heading frame, then turn by the camera yaw.
            forward = _uniform(rng, (config.object_distance_m[0], min(config.object_distance_m[1], wall_z - 1.5)))
            lateral = forward * half_fov_tan * _uniform(rng, (-0.8, 0.8))
            x = camera.position[0] + lateral * math.cos(yaw) + forward * math.sin(yaw)
            z = camera.position[2] - lateral * math.sin(yaw) + forward * math.cos(yaw)
            cube_yaw = _uniform(rng, (0.0, math.pi / 2)) if shape == "cube" else 0.0
            lifted = rng.random() < config.lifted_fraction
            lift = _uniform(rng, config.lift_m) if lifted else 0.0
            candidate = SceneObject(shape, colour, x, z, size, height, cube_yaw, lift)
            if (_fits(candidate, camera, wall_z, config) and _footprints_clear(objects, candidate)
                    and _sizes_distinct(objects, candidate)):
                objects.append(candidate)
                break
        else:
            return None
    light = np.array([_uniform(rng, (-0.6, 0.6)), 1.0, _uniform(rng, (-0.8, -0.2))])
    light /= np.linalg.norm(light)
    tint = tuple(float(v) for v in np.array([0.80, 0.76, 0.68]) + rng.uniform(-0.08, 0.08, size=3))
    return Scene(
        camera=camera,
        objects=tuple(objects),
        wall_z=wall_z,
        wall_height=_uniform(rng, config.wall_height_m),
        wall_tint=tint,
        light_direction=tuple(float(v) for v in light),
        floor_tile_m=_uniform(rng, (0.5, 1.0)),
    )
