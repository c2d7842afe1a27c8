"""Resource binding on fake sysfs trees and fake device paths (there is no GPU here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdexec.config.table import load_config
from sdexec.errors import ConfigError, UsageError
from sdexec.exec.binding import (
    Binding,
    Topology,
    bound_properties,
    from_slurm,
    gpu_devices,
    parse_list,
    resolve,
)


def _sysfs(tmp_path: Path, threads: int = 2) -> str:
    """8 CPUs: 4 cores x 2 threads (siblings i and i+4), two NUMA nodes (0-1,4-5 / 2-3,6-7)."""
    root = tmp_path / "sys"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "online").write_text("0-7\n")
    for cpu in range(8):
        topo = root / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        core = cpu % 4
        sib = f"{core},{core + 4}" if threads == 2 else str(cpu)
        topo.joinpath("thread_siblings_list").write_text(sib + "\n")
    for node, cpus in ((0, "0-1,4-5"), (1, "2-3,6-7")):
        d = root / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    return str(root)


def test_topology_reads_siblings_and_nodes(tmp_path: Path) -> None:
    topo = Topology.read(_sysfs(tmp_path))
    assert topo.online == frozenset(range(8))
    assert topo.with_siblings({1}) == {1, 5}
    assert topo.nodes_of({1, 5}) == {0}
    assert topo.nodes_of({1, 2}) == {0, 1}


def test_cores_become_cpus_with_siblings_nodes_and_scaled_memory(tmp_path: Path) -> None:
    topo = Topology.read(_sysfs(tmp_path))
    site = {
        "MemoryMax": "50%",
        "MemoryHigh": "8G",
        "MemorySwapMax": "infinity",
        "MemoryMin": "1G",
        "MemoryLow": "10%",
    }
    props = bound_properties(Binding(cores=frozenset({0, 1})), site, topo)
    assert props["AllowedCPUs"] == "0-1,4-5"  # 4 of 8 CPUs: a share of 1/2
    assert props["AllowedMemoryNodes"] == "0"
    assert props["MemoryMax"] == "25%"
    assert props["MemoryHigh"] == "4G"
    assert props["MemorySwapMax"] == "infinity"
    assert props["MemoryMin"] == "1G" and props["MemoryLow"] == "10%"  # never scaled
    assert "DevicePolicy" not in props


def test_percentages_are_rounded_to_a_whole_percent(tmp_path: Path) -> None:
    topo = Topology.read(_sysfs(tmp_path, threads=1))
    props = bound_properties(Binding(cores=frozenset({0, 1, 2})), {"MemoryMax": "90%"}, topo)
    assert props["MemoryMax"] == "34%"  # 90% x 3/8 = 33.75%
    props = bound_properties(Binding(cores=frozenset({0})), {"MemoryHigh": "3%"}, topo)
    assert props["MemoryHigh"] == "1%"  # 0.375% rounds to 0: never below 1%


def test_the_site_chooses_what_is_scaled(tmp_path: Path) -> None:
    topo = Topology.read(_sysfs(tmp_path))
    props = bound_properties(
        Binding(cores=frozenset({0})), {"MemoryMax": "8G", "MemoryHigh": "8G"}, topo,
        scale=("MemoryHigh",),
    )  # fmt: skip
    assert props["MemoryMax"] == "8G" and props["MemoryHigh"] == "2G"


def test_cores_not_online_are_a_usage_error(tmp_path: Path) -> None:
    topo = Topology.read(_sysfs(tmp_path))
    with pytest.raises(UsageError, match=r"--cores: 8-9 not online on this node \(online: 0-7\)"):
        bound_properties(Binding(cores=frozenset({8, 9})), {}, topo)


def _devices(tmp_path: Path, names: list[str]) -> str:
    dev = tmp_path / "dev"
    for name in names:
        (dev / name).parent.mkdir(parents=True, exist_ok=True)
        (dev / name).write_text("")
    return str(dev)


def test_nvidia_gpus_and_their_control_nodes(tmp_path: Path) -> None:
    dev = _devices(tmp_path, ["nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"])
    assert gpu_devices({0, 2}, dev) == [f"{dev}/nvidia0", f"{dev}/nvidia2",
                                        f"{dev}/nvidiactl", f"{dev}/nvidia-uvm"]  # fmt: skip


def test_drm_gpus_and_kfd(tmp_path: Path) -> None:
    dev = _devices(tmp_path, ["dri/renderD128", "dri/renderD129", "dri/card1", "kfd"])
    assert gpu_devices({1}, dev) == [f"{dev}/dri/renderD129", f"{dev}/dri/card1", f"{dev}/kfd"]


def test_a_gpu_without_device_node_is_a_usage_error(tmp_path: Path) -> None:
    dev = _devices(tmp_path, ["nvidia0"])
    with pytest.raises(UsageError, match="--gpus: GPU 3 has no device node"):
        gpu_devices({3}, dev)


def test_gpus_give_a_closed_policy_and_device_allow(tmp_path: Path) -> None:
    dev = _devices(tmp_path, ["nvidia0", "nvidia1", "nvidiactl"])
    topo = Topology.read(_sysfs(tmp_path))
    props = bound_properties(
        Binding(gpus=frozenset({1})), {"DeviceAllow": "/dev/fuse rw"}, topo, dev=dev
    )
    assert props["DevicePolicy"] == "closed"
    assert props["DeviceAllow"] == f"/dev/fuse rw,{dev}/nvidia1 rw,{dev}/nvidiactl rw"
    assert "AllowedCPUs" not in props  # GPUs only: no core binding, nothing scaled


def test_slurm_environment() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_GPUS": "0,2",
        "SLURM_CPU_BIND_TYPE": "mask_cpu:",
        "SLURM_CPU_BIND_LIST": "0x3,0xC0",
    }
    assert from_slurm(env) == Binding(frozenset({0, 1, 6, 7}), frozenset({0, 2}))
    assert from_slurm({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"}) == Binding(
        frozenset(), frozenset({1})
    )
    with pytest.raises(UsageError, match="SLURM_JOB_ID is not set"):
        from_slurm({})
    with pytest.raises(UsageError, match="SLURM_CPU_BIND_LIST"):
        from_slurm({**env, "SLURM_CPU_BIND_LIST": "0xZZ"})


def test_explicit_options_win_over_slurm() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "0,2"}
    assert resolve("3", None, "slurm", env) == Binding(frozenset({3}), frozenset({0, 2}))
    assert resolve(None, "1", "slurm", env) == Binding(frozenset(), frozenset({1}))
    assert not resolve(None, None, None, env)


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "1,,2", "0x3", "9000"])
def test_bad_lists_name_the_option(text: str) -> None:
    with pytest.raises(UsageError, match="--cores"):
        parse_list(text, "--cores")


def test_flux_idset_form() -> None:
    assert parse_list("[0-2,5]", "--cores") == {0, 1, 2, 5}


def test_min_and_low_are_refused_as_scaled(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sdexec]\nbind-scale-memory = ["MemoryMax", "MemoryLow"]\n')
    with pytest.raises(ConfigError, match=r"MemoryLow.* is a guarantee and is never scaled"):
        load_config(str(cfg))
    cfg.write_text('[sdexec]\nbind-scale-memory = ["MemoryMax"]\n')
    assert load_config(str(cfg)).sdexec.bind_scale_memory == ("MemoryMax",)
