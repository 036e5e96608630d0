"""Real English text for tests that read documents, frozen so that token counts never move.

A copy of the project README as it stood when these tests were written: the README itself
changes with the docs, and a test that groups documents by token count must not.
"""

from pathlib import Path

SAMPLE_TEXT_PATH = Path(__file__).parent / "fixtures" / "sample_text.md"
SAMPLE_TEXT = SAMPLE_TEXT_PATH.read_text()
