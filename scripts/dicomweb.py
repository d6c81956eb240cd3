#!/usr/bin/env python3
"""DICOMweb deployment: Orthanc (our config, local clients only) + MONAI Label on its DICOMweb.

    python scripts/dicomweb.py serve    # what `make serve DATASTORE=dicomweb` runs
    python scripts/dicomweb.py orthanc  # Orthanc alone, loaded with the sample data (Ctrl-C stops it)

`serve` writes the sample dataset as DICOM (CT series + SEG support labels) if needed, starts
Orthanc with storage under --storage, uploads the sample data if the PACS is empty, then runs
`monailabel start_server --studies http://127.0.0.1:<orthanc port>/dicom-web`. Stopping the server
(Ctrl-C or SIGTERM) stops Orthanc.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from medlsam.dicom import dataset_files, write_dicom_dataset  # noqa: E402
from medlsam.dicom.orthanc import instance_count, start_orthanc, upload  # noqa: E402

logger = logging.getLogger("dicomweb")


def prepare_pacs(args) -> "object":
    data = Path(args.data)
    dicom_dir = data / "dicom"
    logger.info("DICOM sample data: %s", dicom_dir)
    write_dicom_dataset(data, dicom_dir, progress=True)
    orthanc = start_orthanc(args.storage, args.orthanc_port)
    logger.info("Orthanc pid %d: %s (DICOMweb %s), storage %s", orthanc.process.pid, orthanc.url,
                orthanc.dicomweb_url, orthanc.storage_dir)
    if instance_count(orthanc.url) == 0:
        files = dataset_files(dicom_dir)
        logger.info("PACS is empty: uploading %d DICOM files", len(files))
        upload(orthanc.url, files)
    else:
        logger.info("PACS holds %d instances: nothing uploaded", instance_count(orthanc.url))
    return orthanc


def dicomweb_env(args) -> dict:
    cache = Path(args.storage).resolve().parent / "monailabel-cache"
    env = dict(os.environ)
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(cache / "dicom"))
    env.setdefault("MONAI_LABEL_SESSION_PATH", str(cache / "sessions"))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the monailabel launcher runs `python -m monailabel.main`; dcmqi's tools sit beside python
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def cmd_serve(args) -> int:
    orthanc = prepare_pacs(args)
    monailabel = Path(sys.executable).parent / "monailabel"
    cmd = [str(monailabel), "start_server", "--app", str(REPO / "apps" / "medlsam"),
           "--studies", orthanc.dicomweb_url, "--host", args.host, "--port", str(args.port)]
    label_map = Path(args.data) / "label_map.json"
    if label_map.exists():
        cmd += ["--conf", "label_map", str(label_map.resolve())]
    for key, value in args.conf or []:
        cmd += ["--conf", key, value]
    logger.info("MONAI Label: %s", " ".join(cmd))
    logger.info("OHIF: http://%s:%d/ohif/  (MONAI Label mode: /ohif/monai-label?StudyInstanceUIDs=<uid>)",
                args.host, args.port)
    server = subprocess.Popen(cmd, env=dicomweb_env(args), start_new_session=True)

    def forward(signum, _frame):
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = server.wait()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        logger.info("stopping Orthanc")
        orthanc.stop()
    return code


def cmd_orthanc(args) -> int:
    orthanc = prepare_pacs(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops Orthanc like Ctrl-C
    try:
        return orthanc.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        orthanc.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("serve", cmd_serve), ("orthanc", cmd_orthanc)):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(REPO / "sample-datasets"), help="sample dataset (medlsam generate)")
        p.add_argument("--storage", default=str(REPO / "build" / "orthanc"), help="Orthanc's storage folder")
        p.add_argument("--orthanc-port", type=int, default=8042)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="passed to the app")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pydicom_seg").setLevel(logging.WARNING)  # one line per segment and slice range
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
