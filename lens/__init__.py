"""lens: photo in, similar images out.

The public API: :class:`Gallery` (index a folder, search it), :class:`SearchResult` (what a search
returns), :class:`Box` (a region in pixels), :func:`create_method` / :func:`list_methods` (the
similarity methods), :func:`load_image` (safe decoding).
"""

from lens.errors import LensError
from lens.gallery import Gallery, IndexReport
from lens.images import ImageError, load_image
from lens.methods import create_method, list_methods
from lens.types import Box, SearchResult
from lens.version import __version__

__all__ = [
    "Box",
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
