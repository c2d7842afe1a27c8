"""Resource binding: a job's allocation on this node becomes its unit's limits.

What Flux's ``sdexec-constrain-resources`` and its mapper do (2026), for a job that carries its
allocation (``--cores 0-3``, ``--gpus 0,1``, or the resource manager's environment, e.g.
Slurm's):

- ``AllowedCPUs``: the cores, plus their hyperthread siblings (a core is allocated whole);
- ``AllowedMemoryNodes``: the NUMA nodes of those CPUs;
- ``DevicePolicy=closed`` and ``DeviceAllow`` for the GPUs' device nodes (and the shared
  control nodes a GPU needs: ``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/kfd``...);
- the site's ``MemoryHigh``/``MemoryMax``/``MemorySwapMax`` scaled by the job's share of the
  node's CPUs: a percentage rounded to a whole percent, a size floored to a byte, ``infinity``
  unchanged. ``MemoryMin``/``MemoryLow`` are guarantees, never scaled (scaling them would
  promise less than the site asked). Which are scaled is the site's choice
  (``[sdexec] bind-scale-memory``).

Pure, given a :class:`Topology` read from sysfs (``root`` is a parameter: unit tests use fake
trees) and a device directory (fake device paths in tests: no GPU here).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from sdexec.config import memory
from sdexec.config.memory import NEVER_SCALED, SCALABLE
from sdexec.config.show import show_value
from sdexec.errors import UsageError
from sdexec.systemd.enforce import format_cpus, parse_cpus, read_text

NVIDIA_SHARED = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
_LIST_RE = re.compile(r"\[?([0-9]+(-[0-9]+)?)(,([0-9]+(-[0-9]+)?))*\]?")


def parse_list(text: str, option: str) -> frozenset[int]:
    """ "0-3,5" (or Flux's idset "[0-3,5]") as a set; a UsageError naming the option."""
    t = text.strip()
    if not _LIST_RE.fullmatch(t) or len(t) > 4096:
        raise UsageError(f'{option}: {show_value(text)} is not a list of ids (e.g. "0-3,5")')
    ids = parse_cpus(t.strip("[]"))
    if any(i > 8191 for i in ids):
        raise UsageError(f"{option}: {show_value(text)}: ids go up to 8191")
    return ids


@dataclass(frozen=True)
class Topology:
    """This node's CPUs as sysfs shows them."""

    online: frozenset[int]
    siblings: Mapping[int, frozenset[int]] = field(default_factory=dict)
    nodes: Mapping[int, frozenset[int]] = field(default_factory=dict)  # NUMA node -> CPUs

    @classmethod
    def read(cls, root: str = "/sys/devices/system") -> Topology:
        online = parse_cpus(read_text(f"{root}/cpu/online") or "") or frozenset(
            range(os.cpu_count() or 1)
        )
        siblings = {}
        for cpu in online:
            text = read_text(f"{root}/cpu/cpu{cpu}/topology/thread_siblings_list")
            siblings[cpu] = parse_cpus(text) if text else frozenset({cpu})
        nodes = {}
        try:
            entries = os.listdir(f"{root}/node")
        except OSError:
            entries = []
        for entry in entries:
            m = re.fullmatch(r"node([0-9]+)", entry)
            text = read_text(f"{root}/node/{entry}/cpulist") if m else None
            if m and text is not None:
                nodes[int(m.group(1))] = parse_cpus(text)
        return cls(online, siblings, nodes or {0: online})

    def with_siblings(self, cores: Collection[int]) -> frozenset[int]:
        out: set[int] = set()
        for c in cores:
            out |= self.siblings.get(c, frozenset({c}))
        return frozenset(out)

    def nodes_of(self, cpus: Collection[int]) -> frozenset[int]:
        return frozenset(n for n, members in self.nodes.items() if members & set(cpus))


def gpu_devices(gpus: Collection[int], dev: str = "/dev") -> list[str]:
    """The device nodes of GPUs ``gpus`` (NVIDIA, else DRM render nodes + AMD's kfd)."""
    paths: list[str] = []
    for i in sorted(gpus):
        nvidia = os.path.join(dev, f"nvidia{i}")
        render = os.path.join(dev, "dri", f"renderD{128 + i}")
        card = os.path.join(dev, "dri", f"card{i}")
        if os.path.exists(nvidia):
            paths.append(nvidia)
        elif os.path.exists(render):
            paths += [render, *([card] if os.path.exists(card) else [])]
        else:
            raise UsageError(
                f"--gpus: GPU {i} has no device node on this node "
                f"(looked for {nvidia} and {render})"
            )
    if any(os.path.basename(p).startswith("nvidia") for p in paths):
        shared = [os.path.join(dev, name) for name in NVIDIA_SHARED]
    else:
        shared = [os.path.join(dev, "kfd")]
    return paths + [p for p in shared if os.path.exists(p)]


@dataclass(frozen=True)
class Binding:
    """A job's allocation on this node: cores and GPUs (by index), either may be empty."""

    cores: frozenset[int] = frozenset()
    gpus: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.cores or self.gpus)


def from_slurm(environ: Mapping[str, str]) -> Binding:
    """The allocation Slurm describes in a step's environment.

    GPUs: ``SLURM_STEP_GPUS`` (else ``SLURM_JOB_GPUS``). Cores: the union of
    ``SLURM_CPU_BIND_LIST``'s masks when ``SLURM_CPU_BIND_TYPE`` says ``mask_cpu`` (what
    ``--cpu-bind`` exports); Slurm exports no core ids otherwise, so then none are bound.
    """
    if "SLURM_JOB_ID" not in environ:
        raise UsageError("--bind-from slurm: SLURM_JOB_ID is not set (not inside a Slurm job)")
    gpus_text = environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS") or ""
    gpus = parse_list(gpus_text, "SLURM_STEP_GPUS") if gpus_text else frozenset()
    cores: set[int] = set()
    if "mask_cpu" in environ.get("SLURM_CPU_BIND_TYPE", ""):
        for mask in environ.get("SLURM_CPU_BIND_LIST", "").split(","):
            m = mask.strip().lower().removeprefix("0x")
            if not m:
                continue
            if not re.fullmatch(r"[0-9a-f]{1,2048}", m):
                raise UsageError(
                    f"SLURM_CPU_BIND_LIST: {show_value(mask)} is not a hex CPU mask (e.g. 0x3)"
                )
            n = int(m, 16)
            cores.update(i for i in range(n.bit_length()) if n >> i & 1)
    return Binding(frozenset(cores), gpus)


def resolve(
    cores: str | None, gpus: str | None, bind_from: str | None, environ: Mapping[str, str]
) -> Binding:
    """``--cores``/``--gpus``/``--bind-from`` as a Binding (explicit options win)."""
    base = Binding()
    if bind_from is not None:
        if bind_from != "slurm":
            raise UsageError(f"--bind-from: {show_value(bind_from)} is not supported (slurm)")
        base = from_slurm(environ)
    return Binding(
        parse_list(cores, "--cores") if cores is not None else base.cores,
        parse_list(gpus, "--gpus") if gpus is not None else base.gpus,
    )


def _scale(value: str, share: float) -> str:
    parsed = memory.parse_memory(value)
    if isinstance(parsed, memory.MemoryPercent):
        percent = max(1, round(parsed.permyriad * share / 100)) if parsed.permyriad else 0
        return f"{percent}%"
    if parsed.bytes == memory.INFINITY:
        return value
    return memory.format_memory(memory.MemoryBytes(int(parsed.bytes * share)))


def bound_properties(
    binding: Binding,
    configured: Mapping[str, str],
    topo: Topology,
    *,
    scale: Collection[str] = SCALABLE,
    dev: str = "/dev",
) -> dict[str, str]:
    """The ``sdexec-properties`` of a bound job: the site's, bound and scaled (strings)."""
    props = dict(configured)
    if binding.cores:
        unknown = binding.cores - topo.online
        if unknown:
            raise UsageError(
                f"--cores: {format_cpus(unknown)} not online on this node "
                f"(online: {format_cpus(topo.online)})"
            )
        cpus = topo.with_siblings(binding.cores)
        props["AllowedCPUs"] = format_cpus(cpus)
        nodes = topo.nodes_of(cpus)
        if nodes:
            props["AllowedMemoryNodes"] = format_cpus(nodes)
        share = len(cpus & topo.online) / len(topo.online)
        for name in scale:
            if name in props and name not in NEVER_SCALED:
                props[name] = _scale(props[name], share)
    if binding.gpus:
        devices = gpu_devices(binding.gpus, dev)
        props["DevicePolicy"] = "closed"
        allow = [e.strip() for e in props.get("DeviceAllow", "").split(",") if e.strip()]
        props["DeviceAllow"] = ",".join([*allow, *(f"{d} rw" for d in devices)])
    return props
