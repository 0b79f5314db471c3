"""Getting a machine ready: the weights download and the doctor that checks the machine.

The UI takes only this package's public face (below); nothing here imports torch, LightX2V or
huggingface_hub at import time."""

from install.doctor import DoctorReport, Finding, Status, run_doctor
from install.progress import DownloadPhase, DownloadProgress, format_bytes, format_eta, format_rate
from install.tinyvae import download_tiny_vae
from install.weights import APPROX_TOTAL_BYTES, iter_download

__all__ = ["APPROX_TOTAL_BYTES", "DoctorReport", "DownloadPhase", "DownloadProgress", "Finding", "Status",
           "download_tiny_vae", "format_bytes", "format_eta", "format_rate", "iter_download", "run_doctor"]
