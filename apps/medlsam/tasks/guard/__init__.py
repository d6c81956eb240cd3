"""Server-level protection of the MONAI Label server that runs this app.

MONAI Label's own routes read ids as paths, run long work on the event loop, approve any CORS
origin and take uploads of any size. `install` (called once the server has started the app)
puts the app's own routes in their place and adds one middleware; see docs/SECURITY.md.
"""

from .install import install

__all__ = ["install"]
