"""lens: photo in, similar images out.

The public API: :class:`Gallery` (index a folder, search it), :func:`create_method` /
:func:`list_methods` (the similarity methods), :func:`load_image` (safe decoding).
"""

__version__ = "0.1.0"

from lens.errors import LensError  # noqa: E402
from lens.gallery import Gallery, IndexReport, SearchResult  # noqa: E402
from lens.images import ImageError, load_image  # noqa: E402
from lens.methods import create_method, list_methods  # noqa: E402

__all__ = [
    "Gallery",
    "ImageError",
    "IndexReport",
    "LensError",
    "SearchResult",
    "__version__",
    "create_method",
    "list_methods",
    "load_image",
]
