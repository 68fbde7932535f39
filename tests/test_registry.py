"""The op registry: every schema has a reference and a fake kernel; backend selection rules."""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import recsys_kernels as rk
from recsys_kernels import _backend, _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpp_schemas() -> dict[str, str]:
    """name -> schema string of every m.def in csrc/ops.cpp (adjacent literals joined)."""
    src = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    schemas = {}
    for call in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', src):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


SCHEMAS = cpp_schemas()


def test_ops_cpp_parsed():
    assert {"embedding_bag", "int8_linear", "topk_scores", "quantize_rowwise"} <= set(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_has_reference_and_fake(name):
    ref = getattr(torch.ops.recsys_kernels, f"{name}_reference").default
    # Compare the parsed schemas, not their spelling.
    expected = torch._C.parse_schema(f"recsys_kernels::{name}_reference" + SCHEMAS[name][len(name):])
    assert ref._schema == expected, f"{name}: reference schema {ref._schema} != ops.cpp {expected}"
    for qualname in (f"recsys_kernels::{name}", f"recsys_kernels::{name}_reference"):
        if qualname == f"recsys_kernels::{name}" and "_C" not in _loader.EXTENSIONS:
            continue
        entry = torch._library.simple_registry.singleton.find(qualname)
        assert entry.fake_impl.kernel is not None, f"{qualname} has no fake kernel"


def test_native_schemas_match_ops_cpp():
    if "_C" not in _loader.EXTENSIONS:
        pytest.skip("C++ extension not loaded")
    for name, schema in SCHEMAS.items():
        native = getattr(torch.ops.recsys_kernels, name).default
        assert native._schema == torch._C.parse_schema(f"recsys_kernels::{schema}")


def test_every_public_op_is_registered_with_a_reference():
    for op in _backend.ops():
        assert _backend.availability(op)["reference"].startswith("yes")
    assert set(_backend.ops()) >= {n for n in SCHEMAS if not n.endswith("_backward")}


def test_explicit_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        rk.quantize_rowwise(torch.randn(2, 4), 8, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        rk.set_backend("nope")


def test_explicit_unavailable_backend_raises_with_reason():
    # CUDA C++ on CPU tensors can never run: the error names the backend and the reason.
    with pytest.raises(rk.BackendUnavailableError, match="cuda"):
        rk.quantize_rowwise(torch.randn(2, 4), 8, backend="cuda")


def test_set_backend_precedence():
    w = torch.randn(3, 4)
    prev = rk.set_backend("reference")
    try:
        assert rk.get_backend() == "reference"
        assert _backend.resolve("quantize_rowwise", "cpu")[0] == "reference"
        # the argument beats the global selection
        with pytest.raises(rk.BackendUnavailableError):
            rk.quantize_rowwise(w, 8, backend="cuda")
        rk.set_backend("cuda")
        with pytest.raises(rk.BackendUnavailableError):
            rk.quantize_rowwise(w, 8)
        rk.quantize_rowwise(w, 8, backend="reference")
    finally:
        rk.set_backend(prev)


def test_auto_prefers_native_then_reference():
    name, _ = _backend.resolve("quantize_rowwise", "cpu", "auto")
    expected = "cpu" if "cpu" in _backend.available_backends("quantize_rowwise", "cpu") else "reference"
    assert name == expected


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradient_recorded_exactly_when_needed(backend):
    """_common.call skips the ops' autograd layer when no gradient can be needed: results must not
    change, and a gradient must still be recorded whenever grad mode is on and an input (also one
    inside a tensor list) requires it."""
    if backend not in _backend.available_backends("embedding_bag", "cpu"):
        pytest.skip(f"no {backend} embedding_bag here")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 8, generator=g)
    idx, off = torch.randint(0, 20, (12,), generator=g), torch.tensor([0, 5, 12])
    plain = rk.embedding_bag(weight, idx, off, backend=backend)
    assert plain.grad_fn is None
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        assert rk.embedding_bag(w, idx, off, backend=backend).grad_fn is None
    tracked = rk.embedding_bag(w, idx, off, backend=backend)
    assert tracked.grad_fn is not None and torch.equal(tracked.detach(), plain)
    tracked.sum().backward()
    assert torch.equal(w.grad, torch.bincount(idx, minlength=20).float()[:, None].expand(20, 8))
    # a table inside the grouped op's tensor list
    grouped = rk.embedding_bag_grouped([weight, w], [idx, idx], [off, off], backend=backend)
    assert grouped.grad_fn is not None
    assert rk.embedding_bag_grouped([weight, weight], [idx, idx], [off, off], backend=backend).grad_fn is None


def _differentiable_calls():
    """(inputs, {op: fn(user-side tensor, item-side tensor, item bias, backend) -> float output}):
    every single-lookup op with a gradient, on inputs (queries or per-sample weights, items or
    table, item bias) that the caller makes require grad."""
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(5, 8, generator=g), torch.randn(9, 8, generator=g), torch.randn(9, generator=g))
    user_idx, item_idx = torch.randint(0, 5, (11,), generator=g), torch.randint(0, 9, (11,), generator=g)
    offsets = torch.tensor([0, 2, 2, 5, 9, 11])
    return inputs, {
        "embedding_bag": lambda u, i, b, be: rk.embedding_bag(i, user_idx, offsets, backend=be,
                                                              per_sample_weights=u[0, :1].expand(11)),
        "pair_scores": lambda u, i, b, be: rk.pair_scores(u, i, user_idx, item_idx, item_bias=b, backend=be),
        "candidate_scores": lambda u, i, b, be: rk.candidate_scores(u, i, offsets, item_idx, item_bias=b, backend=be),
        "candidate_topk": lambda u, i, b, be: rk.candidate_topk(u, i, offsets, item_idx, 2, item_bias=b,
                                                                backend=be)[0],
        "topk_scores": lambda u, i, b, be: rk.topk_scores(u, i, 3, item_bias=b, backend=be)[0],
    }


def _skip_unless_backend(backend):
    if backend not in _backend.available_backends("pair_scores", "cpu"):
        pytest.skip(f"no {backend} backend on CPU tensors here")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_autograd_kernel_is_ours(monkeypatch, backend):
    """The ops' autograd kernel is _common's, not torch.library.register_autograd's, whose
    per-call argument filling cost ~25 us (a 20-row embedding_bag with a trainable table: 40 ->
    18 us): with torch's filling disabled, every single-lookup op with a differentiable input
    still records its gradient, and the gradients are the reference's."""
    _skip_unless_backend(backend)
    inputs, calls = _differentiable_calls()

    def grads(fn, be):
        leaves = [t.clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*leaves, be).sum(), leaves, allow_unused=True)

    def fail(*args, **kwargs):
        raise AssertionError("torch's register_autograd kernel ran")

    monkeypatch.setattr(torch._library.utils, "fill_defaults", fail)
    for name, fn in calls.items():
        for ours, ref in zip(grads(fn, backend), grads(fn, "reference")):
            assert (ours is None) == (ref is None), name
            if ours is not None:
                torch.testing.assert_close(ours, ref, msg=name)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_double_backward_raises(backend):
    """A gradient of a gradient through any op raises, naming the backward op: the native ops
    fell through torch's fallback and returned wrong second derivatives (a deprecation warning
    only). The first-order gradients under create_graph=True stay right."""
    _skip_unless_backend(backend)
    inputs, calls = _differentiable_calls()
    for name, fn in calls.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        first = torch.autograd.grad(fn(*leaves, backend).pow(2).sum(), leaves[:2], create_graph=True)
        ref_leaves = [t.detach().requires_grad_() for t in leaves]
        expected = torch.autograd.grad(fn(*ref_leaves, "reference").pow(2).sum(), ref_leaves[:2])
        torch.testing.assert_close(first, expected, msg=name)
        with pytest.raises(RuntimeError, match=r"_backward: a gradient of a gradient"):
            torch.autograd.grad(sum(g.sum() for g in first), leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_vmap_over_trainable_inputs_records_their_gradient(backend):
    """torch.func.vmap over an op whose batched input requires grad: one call per sample (torch's
    batching fallback), each recorded by autograd, so the gradient is a loop's. Batched tensors do
    not report requires_grad, and _common.call went below the Autograd key: the output came back
    without a gradient and backward silently left that term out. torch.func.grad still raises."""
    _skip_unless_backend(backend)
    inputs, calls = _differentiable_calls()
    for name, fn in calls.items():
        for arg in (0, 1):  # the user side batched, then the item side
            batch = torch.stack([inputs[arg], inputs[arg] * 2 - 1])

            def f(x, arg=arg):
                args = list(inputs)
                args[arg] = x
                return fn(*args, backend)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "performance drop" note on the fallback
                leaf = batch.clone().requires_grad_()
                out = torch.func.vmap(f)(leaf)
                assert out.requires_grad, name
                weights = torch.randn_like(out)
                (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
                loop_leaf = batch.clone().requires_grad_()
                expected = torch.stack([f(x) for x in loop_leaf.unbind()])
                (loop_grad,) = torch.autograd.grad((expected * weights).sum(), loop_leaf)
            torch.testing.assert_close(out.detach(), expected.detach(), msg=name)
            torch.testing.assert_close(grad, loop_grad, msg=name)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda x: calls["pair_scores"](x, inputs[1], inputs[2], backend).sum())(inputs[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_forward_mode_ad_raises(backend):
    """No op has a forward-mode formula, so a tangent on any argument raises, as torch's
    embedding_bag does; it was dropped (torch.func.jvp returned zeros). Int8Linear (its direct
    call to the C++ kernel) and the grouped op (torch's autograd kernel) included."""
    _skip_unless_backend(backend)
    inputs, calls = _differentiable_calls()
    tangents = [torch.ones_like(t) for t in inputs]
    grouped = lambda u, i, b, be: rk.embedding_bag_grouped([i, i], [torch.tensor([1, 2])] * 2,  # noqa: E731
                                                           [torch.tensor([0, 2])] * 2,
                                                           per_sample_weights=[u[0, :2], None], backend=be)
    for name, fn in {**calls, "embedding_bag_grouped": grouped}.items():
        for arg in (0, 1):  # a tangent on the user side, then on the item side
            def f(x, arg=arg):
                args = list(inputs)
                args[arg] = x
                return fn(*args, backend)
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                torch.func.jvp(f, (inputs[arg],), (tangents[arg],))
            with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
                f(fwAD.make_dual(inputs[arg], tangents[arg]))
    if backend == "cpu":
        layer = rk.Int8Linear.from_float(torch.nn.Linear(8, 3))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(layer, (inputs[0],), (tangents[0],))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            layer(fwAD.make_dual(inputs[0], tangents[0]))


def test_tensors_on_two_devices_raise():
    weight = torch.randn(5, 3)
    idx, off = torch.tensor([0, 1]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"one device, got weight on cpu, indices on meta, offsets on cpu"):
        rk.embedding_bag(weight, idx.to("meta"), off)
    with pytest.raises(ValueError, match=r"one device, got .*per_sample_weights on meta"):
        rk.embedding_bag(weight, idx, off, per_sample_weights=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"one device, got weights\[0\] on cpu, .*offsets\[1\] on meta"):
        rk.embedding_bag_grouped([weight, weight], [idx, idx], [off, off.to("meta")])
    with pytest.raises(ValueError, match=r"one device, got .*per_sample_weights\[0\] on meta"):
        rk.embedding_bag_grouped([weight, weight], [idx, idx], [off, off],
                                 per_sample_weights=[torch.ones(2, device="meta"), torch.ones(2)])


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_env_var_selects_backend():
    out = _run("import recsys_kernels as rk; print(rk.get_backend())", {"RECSYS_KERNELS_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    out = _run("import recsys_kernels", {"RECSYS_KERNELS_BACKEND": "tritn"})  # a typo names the variable
    assert out.returncode != 0
    assert "ValueError: unknown RECSYS_KERNELS_BACKEND 'tritn'; choose one of" in out.stderr


def test_missing_extension_falls_back_to_reference():
    # Block the compiled module: the package must still import, warn, and run on the reference.
    code = (
        "import sys; sys.modules['recsys_kernels._C'] = None\n"
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import recsys_kernels as rk\n"
        "assert any('Falling back to the reference backend' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "from recsys_kernels import _backend\n"
        "assert _backend.resolve('quantize_rowwise', 'cpu')[0] == 'reference'\n"
        "q = rk.quantize_rowwise(torch.randn(4, 8), 8)\n"
        "assert q.shape == (4, 16)\n"
        "print('ok')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_info_reports_everything():
    d = rk.info()
    assert d["torch"] == torch.__version__
    assert set(d["backends"]) == set(_backend.ops())
    if "_C" in _loader.EXTENSIONS:
        assert d["cpu_features"]["avx2"] in ("yes", "no")
    text = rk.format_info(d)
    assert "quantize_rowwise" in text and "CPU features" in text
    # a backend is "yes" only where it runs on a device this machine has
    from recsys_kernels._info import _cell
    assert _cell("yes (cuda)", {"cpu"}) == "no GPU" and _cell("yes (cuda)", {"cpu", "cuda"}) == "yes"
    assert _cell("yes (cpu, cuda)", {"cpu"}) == "yes" and _cell("not implemented", {"cpu"}) == "-"
    row = next(line for line in text.splitlines() if line.startswith("topk_scores"))
    assert row.split()[3] == "yes"  # cpu
    if "_C_cuda" not in _loader.EXTENSIONS:  # (a build with RECSYS_KERNELS_CUDA=0)
        assert row.split()[1] == "-"
    elif not torch.cuda.is_available():
        assert row.split()[1:3] == ["no", "GPU"]  # cuda


def test_cli_commands_get_their_own_help():
    out = _run("from recsys_kernels.cli import main; raise SystemExit(main(['demo', '--help']))")
    assert out.returncode == 0 and "--quick" in out.stdout and "recsys-kernels demo" in out.stdout
    out = _run("from recsys_kernels.cli import main; raise SystemExit(main(['--help']))")
    assert out.returncode == 0 and "{info,demo,compress,bench}" in out.stdout


def test_cli_info():
    out = _run("from recsys_kernels.cli import main; raise SystemExit(main(['info']))")
    assert out.returncode == 0, out.stderr
    assert "backend selection" in out.stdout


@pytest.mark.parametrize("cap", ["scalar", "avx2", "amx"])
def test_cpu_isa_env_caps_the_path(cap):
    if "_C" not in _loader.EXTENSIONS:
        pytest.skip("C++ extension not loaded")
    order = ["scalar", "avx2", "avx512", "avx512_vnni", "amx"]
    best = rk._C.cpu_features()["best_path"]
    out = _run("import recsys_kernels as rk; print(rk._C.cpu_features()['selected_path'])",
               {"RECSYS_KERNELS_CPU_ISA": cap})
    assert out.returncode == 0, out.stderr
    # the cap lowers the path and never raises it above what the machine has
    assert out.stdout.strip() == order[min(order.index(cap), order.index(best))]


def test_cpu_isa_env_rejects_unknown_names():
    if "_C" not in _loader.EXTENSIONS:
        pytest.skip("C++ extension not loaded")
    out = _run("import recsys_kernels as rk; rk._C.cpu_features()", {"RECSYS_KERNELS_CPU_ISA": "sse9"})
    assert out.returncode != 0 and "RECSYS_KERNELS_CPU_ISA" in out.stderr


def test_l2_prefetch_threshold_is_the_l3_or_the_env(monkeypatch):
    if "_C" not in _loader.EXTENSIONS:
        pytest.skip("C++ extension not loaded")
    monkeypatch.delenv("RECSYS_KERNELS_L2_PREFETCH_MIB", raising=False)
    getconf = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True)  # glibc's sysconf
    l3 = int(getconf.stdout) if getconf.returncode == 0 and getconf.stdout.strip().isdigit() else 0
    expected = l3 >> 20 if l3 > 0 else 32
    assert rk._C.cpu_features()["l2_prefetch_above_mib"] == str(expected)
    monkeypatch.setenv("RECSYS_KERNELS_L2_PREFETCH_MIB", "7")  # read on every call
    assert rk._C.cpu_features()["l2_prefetch_above_mib"] == "7"
    for bad in ("x", "-1", "3.5"):
        monkeypatch.setenv("RECSYS_KERNELS_L2_PREFETCH_MIB", bad)
        with pytest.raises(ValueError, match="RECSYS_KERNELS_L2_PREFETCH_MIB='.*' is not a whole number of MiB"):
            rk._C.cpu_features()


def test_huge_pages_setting_is_the_env(monkeypatch):
    """On unless a virtio balloon negotiated free page reporting (feature bit 5), or as the env says."""
    if "_C" not in _loader.EXTENSIONS:
        pytest.skip("C++ extension not loaded")
    reporting = False
    for path in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"):
        with open(path) as f:
            bits = f.read().strip()
        reporting |= len(bits) > 5 and bits[5] == "1"
    for value, shown in ((None, "off" if reporting else "32"), ("1", "32"), ("0", "off")):
        if value is None:
            monkeypatch.delenv("RECSYS_KERNELS_HUGE_PAGES", raising=False)
        else:
            monkeypatch.setenv("RECSYS_KERNELS_HUGE_PAGES", value)
        assert rk._C.cpu_features()["huge_pages_above_mib"] == shown
    monkeypatch.setenv("RECSYS_KERNELS_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="RECSYS_KERNELS_HUGE_PAGES='yes' is not 0 or 1"):
        rk._C.cpu_features()


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_extension_links_the_shared_cxx_runtime(name):
    """setup.py links the shared libstdc++ by its path, so that a compiler driver which finds only
    the static libstdc++.a (the GPU machine's g++ wrapper) cannot put a second C++ runtime inside
    the extension: with one, every C++ error message that formats a number crashed the process
    there."""
    if name not in _loader.EXTENSIONS:
        pytest.skip(f"recsys_kernels.{name} is not built here")
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    path = _loader.EXTENSIONS[name].__file__
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in needed, f"{path} does not load the shared libstdc++:\n{needed}"
    # and holds no copy of its own: std::ostream's members (_ZNSo..., where the crash was) are imported
    symbols = subprocess.run(["readelf", "-sW", path], capture_output=True, text=True, check=True).stdout
    defined = [line for line in symbols.splitlines()
               if re.search(r"\s_ZNSo\w*", line) and " UND " not in line]
    assert not defined, f"{path} defines std::ostream code of its own:\n" + "\n".join(defined)
