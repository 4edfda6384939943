"""Planning calibration stages from the memory Ray's nodes offer (``aim.stages: auto``)."""

from __future__ import annotations

import pytest

from distmerge.aim.stage_split import NodeMemory, StagePlacement, place_stages

GB = 1000**3


def nodes(*gbs: float) -> list[NodeMemory]:
    return [NodeMemory(f"node{i}", f"10.0.0.{i}", int(gb * GB)) for i, gb in enumerate(gbs)]


def test_a_model_that_fits_one_node_is_one_stage_on_the_largest() -> None:
    plan = place_stages([GB] * 8, GB // 2, nodes(4, 16, 9))
    assert plan == [StagePlacement((0, 8), "node1", "10.0.0.1", 8 * GB + GB // 2)]


def test_a_model_larger_than_every_node_is_split_one_stage_per_node() -> None:
    # 10 layers of 1 GB, 0.5 GB overhead a stage; nodes of 6, 6 and 3 GB: 5 + 5 layers
    plan = place_stages([GB] * 10, GB // 2, nodes(6, 3, 6))
    assert [(p.layers, p.node_id) for p in plan] == [((0, 5), "node2"), ((5, 10), "node0")]
    assert all(p.memory <= 6 * GB for p in plan)
    # every stage fits the node it is on, and the layers are covered once, in order
    assert sum(p.memory for p in plan) == 10 * GB + 2 * (GB // 2)


def test_uneven_layers_embedding_and_head() -> None:
    sizes = [3 * GB, GB, GB, GB, 3 * GB]  # embeddings on layer 0, the head on the last
    plan = place_stages(sizes, 0, nodes(5, 5, 5))
    assert [p.layers for p in plan] == [(0, 3), (3, 5)]
    assert len({p.node_id for p in plan}) == 2


def test_a_cap_makes_smaller_stages_that_share_nodes_with_room() -> None:
    plan = place_stages([GB] * 6, 0, nodes(8, 8), cap=2 * GB)
    assert [p.layers for p in plan] == [(0, 2), (2, 4), (4, 6)]
    assert [p.node_id for p in plan] == ["node1", "node0", "node1"]  # most memory left first


def test_what_cannot_be_placed_is_said() -> None:
    with pytest.raises(ValueError, match=r"layer 2 alone needs 7\.50 GB.*10\.0\.0\.0 \(node0\): 6\.00 GB free"):
        place_stages([GB, GB, 7 * GB], GB // 2, nodes(6, 6))
    with pytest.raises(ValueError, match=r"the model needs 12\.50 GB in all and layers 10\.\. do not fit"):
        place_stages([GB] * 12, GB // 2, nodes(6, 6))
    with pytest.raises(ValueError, match="no alive node"):
        place_stages([GB], 0, [])
    with pytest.raises(ValueError, match=r"aim.stage_memory caps a stage at 1\.00 GB; "
                                         r"raise aim.stage_memory to at least 2\.00 GB or drop it$"):
        place_stages([2 * GB], 0, nodes(8), cap=GB)
    # the nodes, not the cap, are short: the advice is about memory
    with pytest.raises(ValueError, match=r"caps a stage at 9\.00 GB; add nodes or memory"):
        place_stages([GB, 7 * GB], GB // 2, nodes(6, 6), cap=9 * GB)


def test_stages_are_rebalanced_where_they_still_fit() -> None:
    # 10 x 1 GB on two 8 GB nodes: filling the first gives 7 + 3 layers; balanced is 5 + 5
    plan = place_stages([GB] * 10, GB, nodes(8, 8))
    assert [p.layers for p in plan] == [(0, 5), (5, 10)]
    assert {p.node_id for p in plan} == {"node0", "node1"} and all(p.memory == 6 * GB for p in plan)
    # a small second node: balance cannot hold, the greedy plan stands (7 GB + 3 GB)
    plan = place_stages([GB] * 10, GB, nodes(8, 4))
    assert [(p.layers, p.node_id) for p in plan] == [((0, 7), "node0"), ((7, 10), "node1")]


def test_a_cap_no_layer_fits_is_refused_from_the_headers_before_ray_starts(aim_models, monkeypatch, tmp_path) -> None:
    """``aim.stage_memory`` below what one layer needs (its weights, one micro-batch's
    activations, the worker: at least WORKER_BYTES) is refused before Ray is started or joined;
    a cap that leaves room is not refused there."""
    import ray

    from distmerge.aim import calibrate
    from distmerge.aim.feature import AimFeature
    from distmerge.aim.layout import open_base
    from distmerge.aim.stage_plan import WORKER_BYTES, check_stage_cap
    from distmerge.config import AimConfig, CalibrationConfig, parse_config
    from distmerge.engine import cluster
    from distmerge.errors import ConfigError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started for a cap no layer fits"))
    aim = AimConfig(calibration=CalibrationConfig(dataset="builtin", n_samples=6, block_size=512),
                    stage_memory=f"{WORKER_BYTES // 1000**2 - 1}MB")
    with pytest.raises(ConfigError, match=r"^aim\.stages=auto: AIM calibration stages cannot be placed: layer \d "
                                          r"alone needs 5\d\d\.\d\d MB \(computing in float32, .* and aim\.stage_memory "
                                          r"caps a stage at 499\.00 MB; raise aim\.stage_memory to at least 5\d\d\.\d\d "
                                          r"MB or drop it$"):
        calibrate(aim_models["llama"], aim, None, progress=False)
    checkpoint, layout = open_base(aim_models["llama"])
    check_stage_cap(checkpoint, layout, 2 * WORKER_BYTES, 512, 4, None)  # room: no refusal
    # The commands ask the feature whether it needs Ray before starting it (merge: needs_ray,
    # calibrate: pipeline_reason): the same refusal comes from there.
    base = str(aim_models["llama"])
    config = parse_config({"merge_method": "task_arithmetic", "base_model": base,
                           "models": [{"model": base, "parameters": {"weight": 1.0}}],
                           "aim": {"stage_memory": "499MB"}})
    with pytest.raises(ConfigError, match=r"aim\.stage_memory caps a stage at 499\.00 MB; raise"):
        AimFeature(config).needs_ray(tmp_path)
    roomy = config.model_copy(update={"aim": config.aim.model_copy(update={"stage_memory": 2 * WORKER_BYTES})})
    assert "aim.stage_memory caps each calibration stage" in AimFeature(roomy).pipeline_reason()
