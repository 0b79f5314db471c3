"""Setup doctor against described machines (fake NVML and probes) and against this real machine."""

from __future__ import annotations

import os

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from install import doctor as d
from pipeline.machine.gpu import GIB, NO_TORCH, GpuMonitor
from install.verify import VerifyProblem, VerifyReport

ROOT = Path(__file__).resolve().parents[1]


class FakeNvml:
    """The slice of pynvml that GpuMonitor calls, describing one card."""

    def __init__(self, *, name="NVIDIA GeForce RTX 3060", total_gib=12.0, used_gib=0.4, cc=(8, 6),
                 driver="580.95.05", cuda_driver=13000, present=True):
        self.name, self.cc, self.driver, self.cuda_driver, self.present = name, cc, driver, cuda_driver, present
        self.total, self.used = int(total_gib * GIB), int(used_gib * GIB)

    def nvmlInit(self):  # noqa: N802 - pynvml's names
        if not self.present:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle):  # noqa: N802
        return self.name  # str, as nvidia-ml-py returns it

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):  # noqa: N802
        return self.cuda_driver

    def nvmlDeviceGetCudaComputeCapability(self, handle):  # noqa: N802
        return self.cc


def ok_weights(path: Path) -> VerifyReport:
    return VerifyReport(path, (), 48, 22_250_000_000, True, False, None)


def machine(nvml: FakeNvml, *, ram_gib: float = 64, **overrides) -> d.SystemProbes:
    """A well set-up machine; tests change one fact at a time."""
    probes = d.SystemProbes(
        monitor=GpuMonitor(nvml=nvml, torch=NO_TORCH),
        memory=lambda: d.MemoryInfo(int(ram_gib * GIB), int(ram_gib * 0.8 * GIB)),
        disk_free=lambda _p: 500 * 10**9,
        torch_build=lambda: d.TorchBuild(installed=True, version="2.11.0+cu130", cuda="13.0"),
        has_module=lambda _name: True,
        environ={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        verify_weights=ok_weights,
        platform="linux",
    )
    return replace(probes, **overrides)


def run(probes: d.SystemProbes, tmp_path: Path) -> d.DoctorReport:
    return d.run_doctor(weights_dir=tmp_path / "w", outputs_dir=tmp_path / "o", probes=probes)


def test_rtx3060_with_16gb_ram_warns_about_ram_and_says_what_to_do(tmp_path):
    report = run(machine(FakeNvml(), ram_gib=16), tmp_path)

    ram = report.get("System RAM")
    assert ram.status is d.Status.WARN
    assert "16.0 GB installed" in ram.detail and "19 GB" in ram.detail
    assert "can run: low-ram (not: fast, tiled-vae, lean, chunked-rope)" in ram.detail
    assert "32 GB" in ram.fix and "lazy_load" in ram.fix
    gpu, path = report.get("GPU"), report.get("INT8 path")
    assert gpu.status is d.Status.OK and "RTX 3060" in gpu.detail and "8.6 (Ampere)" in gpu.detail
    assert path.status is d.Status.OK and "FP8 weights would only save disk" in path.detail
    assert report.get("VRAM").status is d.Status.OK and "12.0 GB total" in report.get("VRAM").detail
    assert report.get("Driver / PyTorch").status is d.Status.OK
    assert report.worst is d.Status.WARN and not report.has_failures
    assert all(f.fix for f in report.findings)


def test_well_equipped_machine_is_all_green(tmp_path):
    report = run(machine(FakeNvml(), ram_gib=64), tmp_path)
    assert [f.name for f in report.findings if f.status is not d.Status.OK] == ["Tiny VAE"]  # optional: INFO
    assert report.get("Tiny VAE").status is d.Status.INFO
    assert report.headline() == "Everything checked is ready."


def test_no_gpu(tmp_path):
    report = run(machine(FakeNvml(present=False)), tmp_path)
    assert report.get("GPU").status is d.Status.FAIL and "No NVIDIA GPU" in report.get("GPU").detail
    assert "nvidia-smi" in report.get("GPU").fix
    assert report.get("VRAM").status is d.Status.FAIL
    assert report.get("Driver / PyTorch").status is d.Status.FAIL
    assert report.get("INT8 path") is None and report.has_failures


def test_nvml_package_missing_says_so(tmp_path):
    probes = machine(FakeNvml(present=False), has_module=lambda name: name != "pynvml")
    assert "nvidia-ml-py" in run(probes, tmp_path).get("GPU").fix


def test_old_driver_for_a_cuda13_torch(tmp_path):
    report = run(machine(FakeNvml(driver="570.86.10", cuda_driver=12080)), tmp_path)
    check = report.get("Driver / PyTorch")
    assert check.status is d.Status.FAIL
    assert "570.86.10" in check.detail and "CUDA 13.0" in check.detail
    assert "R580" in check.fix and "whl/cu128" in check.fix
    assert "the matching build is cu128 (CUDA 12.8" in check.detail
    assert check.fix.endswith("pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 --index-url "
                              "https://download.pytorch.org/whl/cu128")  # what ./run.sh would install


def test_the_doctor_names_the_build_for_an_old_driver_or_none(tmp_path):
    probes = machine(FakeNvml(driver="560.35.03", cuda_driver=12060), torch_build=lambda: d.TorchBuild(False))
    check = run(probes, tmp_path).get("Driver / PyTorch")
    assert "matching build is cu126" in check.detail and check.fix.endswith("whl/cu126")
    probes = machine(FakeNvml(driver="535.230.02", cuda_driver=12020), torch_build=lambda: d.TorchBuild(False))
    check = run(probes, tmp_path).get("Driver / PyTorch")
    assert "none (driver too old)" in check.detail and "Update the NVIDIA driver" in check.fix


def test_cuda12_torch_on_the_same_old_driver_is_fine(tmp_path):
    probes = machine(FakeNvml(driver="570.86.10", cuda_driver=12080),
                     torch_build=lambda: d.TorchBuild(True, "2.11.0+cu128", "12.8"))
    assert run(probes, tmp_path).get("Driver / PyTorch").status is d.Status.OK


@pytest.mark.parametrize("build, expected", [
    (d.TorchBuild(installed=False), "not installed"),
    (d.TorchBuild(True, "2.11.0+cpu", None), "CPU-only"),
    (d.TorchBuild(True, error="OSError: libcudart.so.13: cannot open"), "fails to import"),
])
def test_torch_problems(tmp_path, build, expected):
    check = run(machine(FakeNvml(), torch_build=lambda: build), tmp_path).get("Driver / PyTorch")
    assert check.status is d.Status.FAIL and expected in check.detail


def test_pre_ampere_card_cannot_run_the_int8_path(tmp_path):
    report = run(machine(FakeNvml(name="NVIDIA GeForce RTX 2080 Ti", cc=(7, 5), total_gib=11)), tmp_path)
    assert report.get("INT8 path").status is d.Status.FAIL and "sm_80" in report.get("INT8 path").detail
    assert report.get("VRAM").status is d.Status.WARN  # 11 GB: 480p only


def test_busy_gpu_and_small_gpu(tmp_path):
    busy = run(machine(FakeNvml(used_gib=3.0)), tmp_path).get("VRAM")
    assert busy.status is d.Status.WARN and "3.0 GB in use" in busy.detail and "Close programs" in busy.fix
    small = run(machine(FakeNvml(total_gib=6)), tmp_path).get("VRAM")
    assert small.status is d.Status.FAIL


@pytest.mark.parametrize("environ, platform, status", [
    ({}, "linux", d.Status.OK),  # unset: app.py sets the default itself before CUDA starts
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "linux", d.Status.WARN),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}, "linux", d.Status.OK),
    ({}, "win32", d.Status.INFO),
])
def test_allocator_setting(tmp_path, environ, platform, status):
    check = run(machine(FakeNvml(), environ=environ, platform=platform), tmp_path).get("Allocator")
    assert check.status is status
    if status is d.Status.WARN:
        assert "expandable_segments:True" in check.fix
    if not environ and platform == "linux":
        assert "set by the app at start" in check.detail and check.detail.startswith(
            f"PYTORCH_CUDA_ALLOC_CONF={d.APP_ALLOC_CONF}")


def test_the_app_sets_the_allocator_default_the_doctor_reports(monkeypatch, tmp_path):
    """What `python app.py doctor` calls OK must be what the app really sets before CUDA starts."""
    import app

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    demo, _ = app.build_app(app.settings_from_args(["--backend", "fake", "--outputs-dir", str(tmp_path / "out"),
                                                    "--weights-dir", str(tmp_path / "w")]))
    demo.close()
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == d.APP_ALLOC_CONF


def test_missing_packages(tmp_path):
    report = run(machine(FakeNvml(), has_module=lambda name: name not in {"lightx2v", "sageattention", "triton"},
                         platform="win32"), tmp_path)
    assert report.get("LightX2V").status is d.Status.FAIL
    assert report.get("SageAttention").status is d.Status.WARN and "sageattention==1.0.6" in report.get(
        "SageAttention").fix
    assert report.get("Triton").status is d.Status.FAIL and "triton-windows" in report.get("Triton").fix


def test_flash_attention_3_is_offered_on_hopper_only(tmp_path):
    without = machine(FakeNvml(name="NVIDIA H100 80GB HBM3", total_gib=80.0, cc=(9, 0)),
                      has_module=lambda name: name != "flash_attn_interface")
    finding = run(without, tmp_path).get("FlashAttention 3")
    assert finding.status is d.Status.INFO and "README" in finding.fix
    hopper = machine(FakeNvml(name="NVIDIA H100 80GB HBM3", total_gib=80.0, cc=(9, 0)))
    assert run(hopper, tmp_path).get("FlashAttention 3").status is d.Status.OK
    assert run(machine(FakeNvml(cc=(8, 6))), tmp_path).get("FlashAttention 3") is None  # an RTX 3060: not offered
    assert run(machine(FakeNvml(cc=(8, 9))), tmp_path).get("FlashAttention 3") is None


def test_weights_missing_and_disk_too_small(tmp_path):
    def not_there(path: Path) -> VerifyReport:
        return VerifyReport(path, (VerifyProblem(".", "missing", "folder does not exist"),), 0, 0, False, False,
                            None)

    report = run(machine(FakeNvml(), verify_weights=not_there, disk_free=lambda _p: 10 * 10**9), tmp_path)
    assert report.get("Weights").status is d.Status.FAIL and "Not downloaded yet" in report.get("Weights").detail
    assert "python app.py download" in report.get("Weights").fix
    disk = report.get("Disk (weights)")
    assert disk.status is d.Status.FAIL and "10.00 GB free" in disk.detail and "--weights-dir" in disk.fix
    assert report.get("Disk (outputs)").status is d.Status.OK


def test_synthetic_checkpoint_is_flagged(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "README.txt").write_text("SYNTHETIC CHECKPOINT - FOR TESTS AND SIZING ONLY.\n")
    check = run(machine(FakeNvml()), tmp_path).get("Weights")
    assert check.status is d.Status.WARN and "noise" in check.detail


def test_a_check_that_crashes_becomes_a_finding(tmp_path):
    def broken() -> d.MemoryInfo:
        raise RuntimeError("boom")

    report = run(machine(FakeNvml(), memory=broken), tmp_path)
    ram = report.get("System RAM")
    assert ram.status is d.Status.WARN and "could not run" in ram.detail and "boom" in ram.detail
    assert report.get("Weights") is not None  # the rest still ran


def test_monitor_argument_replaces_the_probe_monitor(tmp_path):
    probes = machine(FakeNvml(present=False))
    report = d.run_doctor(weights_dir=tmp_path, outputs_dir=tmp_path, probes=probes,
                          monitor=GpuMonitor(nvml=FakeNvml(name="NVIDIA GeForce RTX 3060 Ti", total_gib=8)))
    assert "RTX 3060 Ti" in report.get("GPU").detail


def test_this_real_machine_reports_everything_without_raising(tmp_path):
    report = d.run_doctor(weights_dir=tmp_path / "weights", outputs_dir=tmp_path)
    names = {f.name for f in report.findings}
    assert {"GPU", "VRAM", "Driver / PyTorch", "System RAM", "Disk (weights)", "Disk (outputs)", "LightX2V",
            "Triton", "SageAttention", "Allocator", "Weights"} <= names
    assert all(f.detail and f.fix and isinstance(f.status, d.Status) for f in report.findings)
    assert report.get("Weights").status is d.Status.FAIL  # an empty folder is never "ready"
    text = report.to_text()
    assert report.headline() in text and "System RAM" in text


def test_cli_doctor(tmp_path, capsys):
    code = d.main_doctor(["--weights-dir", str(tmp_path / "w"), "--outputs-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == (1 if "[FAIL]" in out else 0)
    assert "[FAIL] Weights" in out and code == 1
    assert "python app.py download" in out and "below" not in out.lower()  # no UI buttons in a terminal
    assert "`" not in out and "[WARN] Allocator" not in out
    assert "[INFO] Tiny VAE: Not installed: optional, enables draft decode and better previews." in out
    assert d.main_doctor(["--help"]) == 0


def test_in_the_ui_the_weights_fix_points_at_the_button(tmp_path):
    report = d.run_doctor(weights_dir=tmp_path / "w", outputs_dir=tmp_path, probes=machine(FakeNvml(), verify_weights=d.verify), in_ui=True)
    assert report.get("Weights").fix.startswith("Press Download weights below")
    assert not any("`" in cell for row in report.rows() for cell in row)


def test_modules_import_no_torch_lightx2v_or_gradio_where_they_must_not():
    code = ("import sys; import install, install.doctor, install.weights, install.cli; "
            "assert not {'torch', 'lightx2v', 'gradio', 'huggingface_hub'} & set(sys.modules); "
            "import ui.system_tab; assert 'torch' not in sys.modules and 'lightx2v' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_system_tab_builds_and_its_handlers_render(tmp_path):
    import html

    import gradio as gr

    from install import DownloadPhase, DownloadProgress
    from ui import system_tab as st

    report = run(machine(FakeNvml(), ram_gib=16), tmp_path)
    calls: list[str] = []

    def start_download():
        calls.append("start")
        yield DownloadProgress(DownloadPhase.DOWNLOADING, file="distill_int8/block_0.safetensors", file_index=1,
                               file_count=48, bytes_done=11_100_000_000, bytes_total=22_200_000_000,
                               rate_bps=50e6, eta_s=222)
        yield DownloadProgress(DownloadPhase.DONE, "All 48 weight files are present.")

    with gr.Blocks() as demo, gr.Tab("System"):
        st.build_system_tab(doctor=lambda: report, weights_dir=tmp_path, start_download=start_download)

    # The Download button's handler streams progress, then refreshes the checks (Gradio 6 keeps handlers in
    # demo.fns; they are private to the UI, so this is the way to drive one without a browser).
    handler = next(f.fn for f in demo.fns.values() if f.name == "run_download")
    outputs = list(handler())
    assert calls == ["start"]
    assert outputs[0][0].startswith("⬇️ **Downloading**") and outputs[1][0].startswith("✓ **Weights ready.**")
    assert outputs[-1][1] == st.report_headline(report) and outputs[-1][2] == st.report_html(report)
    # "Stop download" is shown only while the download runs; Download comes back at the end.
    stop = next(b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Stop download")
    assert stop.visible is False
    assert all(o[3]["visible"] is False and o[4]["visible"] is True for o in outputs[:-1])
    assert outputs[-1][3]["visible"] is True and outputs[-1][4]["visible"] is False
    assert not any(isinstance(b, gr.Dataframe) for b in demo.blocks.values())  # no inner scroll box

    table = st.report_html(report)
    assert table.count("<tr>") == len(report.findings) + 1 and "`" not in table
    assert all(html.escape(f.detail) in table for f in report.findings)

    rows = st.report_rows(report)
    assert rows[0][:2] == ["GPU", "✓ ok"] and any(r[1] == "⚠ warning" and "32 GB" in r[3] for r in rows)
    assert st.report_headline(report).startswith("⚠")
    line = st.progress_markdown(next(start_download()))
    assert "50%" in line and "11.10 GB of 22.20 GB" in line and "50.00 MB/s" in line and "3 min 42 s" in line
    failed = st.progress_markdown(DownloadProgress(DownloadPhase.FAILED, "Not enough disk space.\nFree some."))
    assert failed.startswith("✗") and "Free some." in failed


def test_ram_finding_reports_swap_and_rungs(tmp_path):
    mem = d.MemoryInfo(int(64 * GIB), int(50 * GIB), int(8 * GIB), int(6 * GIB))
    ram = run(machine(FakeNvml(), memory=lambda: mem), tmp_path).get("System RAM")
    assert ram.status is d.Status.OK and "swap 8.0 GB (6.0 GB free)" in ram.detail
    assert "can run: fast, tiled-vae, lean, low-ram, chunked-rope." in ram.detail
    none = run(machine(FakeNvml(), memory=lambda: d.MemoryInfo(int(8 * GIB), int(6 * GIB), 0, 0)), tmp_path)
    tiny = none.get("System RAM")
    assert tiny.status is d.Status.FAIL and "no swap" in tiny.detail and "can run: no rung" in tiny.detail
    assert "add RAM or swap" in tiny.fix


def test_the_system_tab_lists_the_attention_kernels_this_gpu_measured(tmp_path):
    from pipeline.backends import kernels
    from pipeline.store.history import History
    from ui.system_tab import kernels_markdown

    assert "No attention kernel measured on this GPU yet" in kernels_markdown([])
    history = History(tmp_path / "history.sqlite3")
    trials = (kernels.Trial("sage_attn2", seconds=0.0498, rel_l2=0.0134),
              kernels.Trial("sdpa_cudnn", seconds=0.0391, rel_l2=0.0029),
              kernels.Trial("sdpa_flash", error="RuntimeError: no kernel"))
    choice = kernels.AttentionChoice("sdpa_cudnn", "sage_attn2", "32760x40x128", "NVIDIA H200", trials)
    history.record_kernel_choice("NVIDIA H200", "NVIDIA H200/32760x40x128/bfloat16/v", choice.to_json())
    text = kernels_markdown(kernels.cached_choices(history, "NVIDIA H200"))
    assert "| 32760x40x128 | sdpa_cudnn | sage_attn2 | 39.1 | 49.8 |" in text
    assert kernels.cached_choices(history, "NVIDIA GeForce RTX 3060") == []  # per GPU
    history.close()
