"""Regenerate examples/ (the app's example query photos) from scikit-image's bundled sample photos."""

from pathlib import Path

from lens.samples import write_examples

if __name__ == "__main__":
    for path in write_examples(Path(__file__).resolve().parents[1] / "examples"):
        print(path)
