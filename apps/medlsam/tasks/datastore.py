"""A local datastore that checks final labels before storing them, and stores them atomically."""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from filelock import FileLock
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.local import DataModel
from monailabel.interfaces.exception import ImageNotFoundException

from medlsam.io import atomic_path


class CheckedLocalDatastore(LocalDatastore):
    """`save_label` runs `validate(image_id, label_file)` for final labels first (it raises a 4xx),
    then writes the label file with one atomic rename, so a crash never leaves half a label."""

    validate: Callable[[str, str], None] | None = None

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if label_tag == "final" and self.validate is not None:
            self.validate(image_id, label_filename)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        with FileLock(self._lock_file):
            os.makedirs(label_dir, exist_ok=True)
            with atomic_path(os.path.join(label_dir, name), suffix="") as tmp:
                shutil.copyfile(label_filename, tmp)
            info = dict(label_info or {})
            info["ts"] = int(os.path.getmtime(os.path.join(label_dir, name)))
            info["name"] = name
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id
