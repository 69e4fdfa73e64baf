"""Mesh specs, `make_mesh`, groups, `describe`, and simulated devices / XLA_FLAGS handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxpar import mesh as mesh_mod
from jaxpar import runtime
from jaxpar.errors import JaxparError
from jaxpar.mesh import AXES, MeshSpec, describe, groups, make_mesh, parse_mesh, simulate_devices

REPO = Path(__file__).resolve().parents[1]
DEVICE_FLAG = "--xla_force_host_platform_device_count"
# A real XLA CPU flag (unknown flags make XLA abort at start-up), checked with this jax version.
HARMLESS_FLAG = "--xla_cpu_use_thunk_runtime=true"


# --- parse_mesh ----------------------------------------------------------------------------------


def test_parse_full_spec():
    spec = parse_mesh("data=2,pipeline=2,tensor=2")
    assert spec == MeshSpec(data=2, pipeline=2, tensor=2)
    assert spec.sizes == (2, 2, 1, 2)  # data, pipeline, context, tensor
    assert spec.is_resolved and spec.size == 8


def test_parse_order_does_not_matter():
    assert parse_mesh("tensor=4,data=2") == MeshSpec(data=2, pipeline=1, tensor=4)


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("tensor=4", (1, 1, 1, 4)),
        ("data=8", (8, 1, 1, 1)),
        ("pipeline=2", (1, 2, 1, 1)),
        ("context=2", (1, 1, 2, 1)),
        ("", (1, 1, 1, 1)),
    ],
)
def test_omitted_axes_are_one(text, sizes):
    assert parse_mesh(text).sizes == sizes


def test_spaces_and_empty_parts_tolerated():
    assert parse_mesh(" data = 2 , tensor= 4 ").sizes == (2, 1, 1, 4)
    assert parse_mesh("data=2,,tensor=4,").sizes == (2, 1, 1, 4)


def test_str_is_the_full_spec():
    assert str(parse_mesh("tensor=4,data=2")) == "data=2,pipeline=1,tensor=4"
    assert parse_mesh(str(MeshSpec(data=2, pipeline=2, tensor=2))) == MeshSpec(
        data=2, pipeline=2, tensor=2
    )
    # `context` only where the sequence is split, so that meshes without it read as before
    assert str(parse_mesh("context=2,tensor=4")) == "data=1,pipeline=1,context=2,tensor=4"


def test_minus_one_is_filled_by_resolve():
    spec = parse_mesh("data=-1,tensor=4")
    assert spec.sizes == (-1, 1, 1, 4)
    assert not spec.is_resolved
    resolved = spec.resolve(8)
    assert resolved == MeshSpec(data=2, pipeline=1, tensor=4)
    assert resolved.is_resolved
    assert parse_mesh("tensor=-1").resolve(8) == MeshSpec(data=1, pipeline=1, tensor=8)
    assert parse_mesh("data=2,pipeline=-1,tensor=2").resolve(8) == MeshSpec(
        data=2, pipeline=2, tensor=2
    )


def test_resolve_of_resolved_spec_checks_the_count():
    spec = MeshSpec(data=2, pipeline=1, tensor=4)
    assert spec.resolve(8) is spec


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("foo=2", ["'foo=2'", "unknown axis 'foo'", "data, pipeline, context, tensor"]),
        ("data=2,expert=4", ["unknown axis 'expert'"]),
        ("tensor=2,tensor=4", ["'tensor=2,tensor=4'", "axis 'tensor' is given twice"]),
        ("tensor=two", ["size 'two' of axis 'tensor' is not an integer"]),
        ("tensor=1.5", ["size '1.5' of axis 'tensor' is not an integer"]),
        ("tensor=", ["size '' of axis 'tensor' is not an integer"]),
        ("tensor=0", ["size 0 of axis 'tensor' must be a positive integer or -1"]),
        ("data=-2", ["size -2 of axis 'data' must be a positive integer or -1"]),
        ("data=-1,tensor=-1", ["'data=-1,tensor=-1'", "at most one axis may be -1"]),
        ("tensor", ["'tensor' must look like AXIS=SIZE"]),
    ],
)
def test_parse_errors(text, fragments):
    with pytest.raises(JaxparError) as e:
        parse_mesh(text)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_minus_one_that_cannot_divide():
    spec = parse_mesh("data=-1,tensor=3")
    with pytest.raises(JaxparError) as e:
        spec.resolve(8)
    msg = str(e.value)
    assert "cannot fill its -1 axis" in msg
    assert "8 devices" in msg and "product 3" in msg


@pytest.mark.parametrize(("text", "needed"), [("data=2,tensor=2", 4), ("data=4,tensor=4", 16)])
def test_product_must_equal_device_count(text, needed):
    with pytest.raises(JaxparError) as e:
        parse_mesh(text).resolve(8)
    msg = str(e.value)
    assert f"needs {needed} devices but 8 are available" in msg
    assert f"--devices {needed}" in msg


# --- make_mesh, groups, describe -----------------------------------------------------------------


def test_make_mesh_uses_all_devices():
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    assert isinstance(mesh, jax.sharding.Mesh)
    assert mesh.axis_names == AXES == ("data", "pipeline", "context", "tensor")
    assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 4
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "context": 1, "tensor": 4}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


def test_make_mesh_fills_minus_one():
    mesh = make_mesh(parse_mesh("tensor=-1"))
    assert dict(mesh.shape) == {"data": 1, "pipeline": 1, "context": 1, "tensor": 8}


def test_make_mesh_with_explicit_devices():
    devices = jax.devices()[:2]
    mesh = make_mesh(parse_mesh("tensor=2"), devices)
    assert dict(mesh.shape) == {"data": 1, "pipeline": 1, "context": 1, "tensor": 2}
    assert mesh.devices.size == 2
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]
    assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 4


def test_make_mesh_explicit_devices_in_given_order():
    devices = list(reversed(jax.devices()[4:8]))
    mesh = make_mesh(parse_mesh("data=2,tensor=2"), devices)
    assert groups(mesh, "tensor") == [[7, 6], [5, 4]]


def test_make_mesh_rejects_wrong_device_count():
    with pytest.raises(JaxparError, match=r"needs 4 devices but 2 are available"):
        make_mesh(parse_mesh("tensor=4"), jax.devices()[:2])
    with pytest.raises(JaxparError, match=r"needs 4 devices but 8 are available"):
        make_mesh(parse_mesh("data=2,tensor=2"))


@pytest.fixture(scope="module")
def mesh222():
    return make_mesh(parse_mesh("data=2,pipeline=2,tensor=2"))


def test_groups_2x2x2(mesh222):
    assert groups(mesh222, "tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(mesh222, "pipeline") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups(mesh222, "data") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_groups_2x1x4():
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    assert groups(mesh, "tensor") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups(mesh, "data") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups(mesh, "pipeline") == [[i] for i in range(8)]


def test_context_sits_next_to_tensor():
    """A context group is the devices just outside a tensor group: the ring's hops run over the
    links next fastest after tensor parallelism's."""
    mesh = make_mesh(parse_mesh("data=2,context=2,tensor=2"))
    assert groups(mesh, "tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(mesh, "context") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert "context groups (devices holding one sequence's pieces), 2 each:" in describe(mesh)


def test_describe_2x2x2(mesh222):
    text = describe(mesh222)
    lines = text.splitlines()
    assert lines[0] == "mesh data=2,pipeline=2,tensor=2  (8 cpu devices)"
    for i in range(8):
        assert f"device {i}" in text
    # the coordinate table, in row-major (data, pipeline, context, tensor) order
    assert "  (0, 0, 0, 0)  ->  device 0" in lines
    assert "  (0, 1, 0, 0)  ->  device 2" in lines
    assert "  (1, 0, 0, 1)  ->  device 5" in lines
    assert "  (1, 1, 0, 1)  ->  device 7" in lines
    for g in ([0, 1], [2, 3], [4, 5], [6, 7]):
        assert f"  {g}" in lines
    assert "  stage 0: [0, 1, 4, 5]" in lines
    assert "  stage 1: [2, 3, 6, 7]" in lines
    assert "  replica 0: [0, 1, 2, 3]" in lines
    assert "  replica 1: [4, 5, 6, 7]" in lines
    assert "tensor groups (devices sharing one layer's shards), 2 devices each:" in lines


# --- simulate_devices (unit) ---------------------------------------------------------------------


def test_simulate_devices_after_start_accepts_the_running_count():
    before = os.environ.get("XLA_FLAGS")
    simulate_devices(8)  # JAX already has 8 CPU devices: nothing to do
    assert os.environ.get("XLA_FLAGS") == before


def test_simulate_devices_after_start_rejects_another_count():
    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(JaxparError) as e:
        simulate_devices(4)
    assert str(e.value) == (
        "the mesh needs 4 devices but JAX already started with 8 CPU devices in this process; "
        "use a mesh of that size"
    )
    assert os.environ.get("XLA_FLAGS") == before


@pytest.fixture
def jax_not_started(monkeypatch):
    """Sends simulate_devices down its before-JAX-starts path; only os.environ changes."""
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    return monkeypatch


def test_simulate_devices_sets_flag_when_absent(jax_not_started):
    jax_not_started.delenv("XLA_FLAGS", raising=False)
    simulate_devices(4)
    assert os.environ["XLA_FLAGS"] == f"{DEVICE_FLAG}=4"


def test_simulate_devices_appends_to_user_flags(jax_not_started):
    jax_not_started.setenv("XLA_FLAGS", f"  {HARMLESS_FLAG} ")
    simulate_devices(4)
    assert os.environ["XLA_FLAGS"].split() == [HARMLESS_FLAG, f"{DEVICE_FLAG}=4"]


def test_simulate_devices_keeps_matching_flag(jax_not_started):
    flags = f"{HARMLESS_FLAG} {DEVICE_FLAG}=4"
    jax_not_started.setenv("XLA_FLAGS", flags)
    simulate_devices(4)
    assert os.environ["XLA_FLAGS"] == flags


def test_simulate_devices_replaces_another_count(jax_not_started):
    # Replaced, not appended: the same count gives the same flags, so a subprocess of a run with
    # another count compiles under the same cache keys as a fresh one.
    jax_not_started.setenv("XLA_FLAGS", f"{DEVICE_FLAG}=2 {HARMLESS_FLAG}")
    simulate_devices(4)
    flags = os.environ["XLA_FLAGS"]
    assert flags == f"{HARMLESS_FLAG} {DEVICE_FLAG}=4"
    assert flags.split()[-1] == f"{DEVICE_FLAG}=4"  # the last occurrence is the one XLA uses


def test_simulate_devices_looks_at_the_last_occurrence(jax_not_started):
    jax_not_started.setenv("XLA_FLAGS", f"{DEVICE_FLAG}=4 {DEVICE_FLAG}=2")
    simulate_devices(4)
    assert os.environ["XLA_FLAGS"].split()[-1] == f"{DEVICE_FLAG}=4"


def test_prepare_rejects_non_positive_devices():
    with pytest.raises(JaxparError, match=r"--devices must be a positive integer, got 0"):
        mesh_mod.prepare(MeshSpec(data=1, pipeline=1, tensor=8), 0)


def test_prepare_in_running_process():
    assert mesh_mod.prepare(parse_mesh("data=2,tensor=4")) == MeshSpec(data=2, pipeline=1, tensor=4)
    assert mesh_mod.prepare(parse_mesh("tensor=-1")) == MeshSpec(data=1, pipeline=1, tensor=8)


def test_prepare_applies_the_runtime_settings_only_when_asked(monkeypatch):
    """A library caller's process keeps its XLA flags and allocator unless it opts in."""
    calls = []
    monkeypatch.setattr(runtime, "xla_flags", lambda: calls.append("xla_flags"))
    monkeypatch.setattr(runtime, "tune_host_allocator", lambda: calls.append("allocator"))
    mesh_mod.prepare(parse_mesh("data=8"))
    assert calls == []
    mesh_mod.prepare(parse_mesh("data=8"), tune_runtime=True)
    assert calls == ["xla_flags", "allocator"]  # the tests run on CPU


# --- the CLI in a fresh process (JAX not started yet) --------------------------------------------


def _run(args, xla_flags=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_cli_mesh_keeps_user_xla_flags():
    proc = _run(["-m", "jaxpar", "mesh", "tensor=4"], xla_flags=HARMLESS_FLAG)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "mesh data=1,pipeline=1,tensor=4  (4 cpu devices)"
    assert "  [0, 1, 2, 3]" in proc.stdout.splitlines()


def test_cli_user_flags_stay_in_xla_flags_and_take_effect(tmp_path):
    """The user's flags survive next to the device count and XLA honours them (a dump appears)."""
    dump = tmp_path / "dump"
    script = (
        "import os, jax\n"
        "from jaxpar.cli import main\n"
        "assert main(['mesh', 'tensor=4']) == 0\n"
        "print('FLAGS=' + os.environ['XLA_FLAGS'])\n"
        "print('COUNT=%d' % jax.device_count())\n"
        "jax.jit(lambda x: x + 1)(1).block_until_ready()\n"
    )
    proc = _run(["-c", script], xla_flags=f"--xla_dump_to={dump}")
    assert proc.returncode == 0, proc.stderr
    cpu_flags = " ".join(f"--{k}={v}" for k, v in runtime.CPU_FLAGS.items())
    assert f"FLAGS=--xla_dump_to={dump} {DEVICE_FLAG}=4 {cpu_flags}" in proc.stdout.splitlines()
    assert "COUNT=4" in proc.stdout.splitlines()
    assert any(dump.iterdir())


def test_cli_device_count_in_user_flags_is_overridden():
    proc = _run(["-m", "jaxpar", "mesh", "tensor=4"], xla_flags=f"{DEVICE_FLAG}=2 {HARMLESS_FLAG}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mesh data=1,pipeline=1,tensor=4  (4 cpu devices)")


def test_cli_devices_flag():
    proc = _run(["-m", "jaxpar", "mesh", "data=2,tensor=2", "--devices", "4"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mesh data=2,pipeline=1,tensor=2  (4 cpu devices)"
    assert "  [0, 1]" in lines and "  [2, 3]" in lines
    assert "  replica 1: [2, 3]" in lines


def test_cli_devices_fills_minus_one():
    proc = _run(["-m", "jaxpar", "mesh", "tensor=-1", "--devices", "4"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mesh data=1,pipeline=1,tensor=4  (4 cpu devices)")


def test_cli_devices_mismatch_exits_2_with_one_line():
    proc = _run(["-m", "jaxpar", "mesh", "tensor=4", "--devices", "8"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxpar: error: mesh data=1,pipeline=1,tensor=4 needs 4 devices")
    assert "but 8 are available" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_product_mismatch_in_fresh_process_names_both_numbers():
    """Without --devices the spec's product is simulated, so a mismatch can only come from -1."""
    proc = _run(["-m", "jaxpar", "mesh", "data=-1,tensor=3", "--devices", "8"])
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "8 devices are not divisible by the other axes' product 3" in lines[0]
