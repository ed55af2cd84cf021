"""Procedurally generated demo clips: deterministic, well-formed, and captioned truthfully."""
import pytest
import torch

from stdit.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SyntheticClips

RES = [(16, 16), (16, 24), (24, 16), (17, 31)]  # square, landscape, portrait, odd


def make(seed=3, n=60, frames=(1, 4, 8), fps=(8.0, 16.0)):
    return SyntheticClips(n, RES, list(frames), list(fps), seed=seed)


def rgb(name):
    return torch.tensor(COLOURS[name]) * 2 - 1


def parse(caption):
    """(shape colour, shape, direction or None, background colour) from the caption template."""
    words = caption.split()
    assert words[0] in ("a", "an") and words[-1] == "background" and words[-3:-1][0] == "a", caption
    direction = words[words.index("moving") + 1] if "moving" in words else None
    return words[1], words[2], direction, words[-2]


def test_deterministic_in_seed_and_index_whatever_the_access_order():
    forward = [make()[i] for i in range(20)]
    ds = make()
    for i in reversed(range(20)):
        s = ds[i]
        assert torch.equal(s.video, forward[i].video)
        assert (s.caption, s.fps, s.sample_id) == (forward[i].caption, forward[i].fps, i)
    # interleaved access on one object changes nothing either
    for i in [7, 3, 7, 19, 0]:
        assert torch.equal(ds[i].video, forward[i].video)
    other = make(seed=4)
    assert any(not torch.equal(other[i].video, forward[i].video) for i in range(5))


def test_shapes_range_and_shape_of():
    ds = make(n=80)
    assert len(ds) == 80
    seen_res, seen_t, seen_fps = set(), set(), set()
    for i in range(len(ds)):
        s = ds[i]
        assert s.video.dtype == torch.float32 and s.video.is_contiguous()
        assert s.video.shape[0] == 3 and tuple(s.video.shape[1:]) == ds.shape_of(i)
        assert s.video.min() >= -1 and s.video.max() <= 1
        seen_res.add(tuple(s.video.shape[2:]))
        seen_t.add(s.video.shape[1])
        seen_fps.add(s.fps)
    assert seen_res == set(RES) and seen_t == {1, 4, 8} and seen_fps == {8.0, 16.0}
    for bad in (80, -1):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.shape_of(bad)
    assert len(list(make(n=5))) == 5  # the sequence protocol stops at IndexError


def test_caption_names_what_the_pixels_show():
    ds = make(n=200)
    corners_match = 0
    for i in range(100):
        s = ds[i]
        fg, shape, direction, bg = parse(s.caption)
        assert fg in COLOURS and bg in COLOURS and fg != bg and shape in SHAPES
        v = s.video
        corners = v[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # [3, T, 4]
        corners_match += bool(torch.equal(corners, rgb(bg)[:, None, None].expand_as(corners)))
        # every pixel is either the background or the shape colour, and both appear in every frame
        is_bg = (v == rgb(bg)[:, None, None, None]).all(0)
        is_fg = (v == rgb(fg)[:, None, None, None]).all(0)
        assert bool((is_bg | is_fg).all())
        assert bool(is_fg.flatten(1).any(1).all()) and bool(is_bg.flatten(1).any(1).all())
    assert corners_match >= 95  # a big square may touch a corner of a tiny frame, rarely


def test_shape_moves_in_the_named_direction():
    ds = make(n=300, frames=(1, 4, 8, 16))
    seen = {d: 0 for d in DIRECTIONS}
    for i in range(120):
        s = ds[i]
        fg, _, direction, bg = parse(s.caption)
        t = s.video.shape[1]
        if t == 1:
            assert direction is None and "moving" not in s.caption
            continue
        assert direction in DIRECTIONS
        seen[direction] += 1
        mask = (s.video != rgb(bg)[:, None, None, None]).any(0).float()  # non-background pixels [T, H, W]
        ys = torch.arange(mask.shape[1]).float()[None, :, None]
        xs = torch.arange(mask.shape[2]).float()[None, None, :]
        area = mask.sum((1, 2))
        cy, cx = (mask * ys).sum((1, 2)) / area, (mask * xs).sum((1, 2)) / area
        dy, dx = float(cy[-1] - cy[0]), float(cx[-1] - cx[0])
        along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[direction]
        assert along > 1 and abs(across) < 0.5, (s.caption, dy, dx)
        # constant speed: the centroid advances every frame (pixel rounding makes single steps uneven)
        step = {"left": -cx, "right": cx, "up": -cy, "down": cy}[direction].diff()
        assert bool((step >= 0).all()), (s.caption, step)
    assert all(n > 0 for n in seen.values()), seen


def _centroids(s, bg):
    mask = (s.video != rgb(bg)[:, None, None, None]).any(0).float()  # non-background pixels [T, H, W]
    area = mask.sum((1, 2))
    ys, xs = torch.arange(mask.shape[1]).float()[None, :, None], torch.arange(mask.shape[2]).float()[None, None, :]
    return (mask * ys).sum((1, 2)) / area, (mask * xs).sum((1, 2)) / area


def test_round_trips_go_out_and_come_back_and_leave_other_clips_alone():
    """A round trip's last frame is its first, its middle frame is far along the named direction; with
    round_trips=0 the world is the one-way world, sample for sample; round_trip_frames bounds their length."""
    plain, trips = make(n=200, frames=(1, 8, 16)), SyntheticClips(200, RES, [1, 8, 16], [8.0, 16.0], seed=3,
                                                                  round_trips=0.5)
    assert all(torch.equal(plain[i].video, SyntheticClips(200, RES, [1, 8, 16], [8.0, 16.0], seed=3,
                                                          round_trips=0.0)[i].video) for i in range(20))
    back = [trips[i] for i in range(200) if " and back " in trips[i].caption]
    moving = [trips[i] for i in range(200) if trips[i].video.shape[1] > 1]
    assert 0.35 < len(back) / len(moving) < 0.65 and all(s.video.shape[1] > 1 for s in back)
    for s in back[:30]:
        fg, _, direction, bg = parse(s.caption)
        assert torch.equal(s.video[:, 0], s.video[:, -1]), s.caption
        cy, cx = _centroids(s, bg)
        mid = s.video.shape[1] // 2
        along = {"left": -(cx[mid] - cx[0]), "right": cx[mid] - cx[0], "up": -(cy[mid] - cy[0]),
                 "down": cy[mid] - cy[0]}[direction]
        assert along > 1, (s.caption, cy, cx)
    short = SyntheticClips(200, RES, [8, 16], [8.0], seed=3, round_trips=0.5, round_trip_frames=8)
    assert all(short[i].video.shape[1] == 8 for i in range(200) if " and back " in short[i].caption)
    assert any(" and back " in short[i].caption for i in range(200))
    from stdit.config import load_config
    from stdit.data.loader import build_dataset
    cfg = load_config("recipes/tiny_long.yaml")  # a run's round trips fit its training window
    data = build_dataset(cfg.data, 0)
    lengths = [data[i].video.shape[1] for i in range(100) if " and back " in data[i].caption]
    assert lengths and max(lengths) <= cfg.data.window
    with pytest.raises(ValueError, match="round_trips"):
        SyntheticClips(4, RES, [1], [8.0], round_trips=1.5)


def test_still_images_and_all_shapes_colours_occur():
    ds = SyntheticClips(400, [(32, 32)], [1], [8.0], seed=0)
    shapes, colours = set(), set()
    for i in range(len(ds)):
        s = ds[i]
        assert s.video.shape[1] == 1 and "moving" not in s.caption
        fg, shape, _, bg = parse(s.caption)
        shapes.add(shape)
        colours |= {fg, bg}
    assert shapes == set(SHAPES) and colours == set(COLOURS)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="resolutions"):
        SyntheticClips(4, [], [1], [8.0], seed=0)
    with pytest.raises(ValueError, match="frame_counts"):
        SyntheticClips(4, RES, [0], [8.0], seed=0)
    with pytest.raises(ValueError, match="fps_choices"):
        SyntheticClips(4, RES, [1], [], seed=0)

