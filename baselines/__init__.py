"""Baseline editors (MEMIT, AlphaEdit) behind :class:`neuraldb.editor.Editor`; importing this
package registers them."""

from baselines import alphaedit, memit

__all__ = ["alphaedit", "memit"]
