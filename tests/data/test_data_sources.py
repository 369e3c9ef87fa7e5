"""Markup stripping of the corpus sources (no downloads: inputs are written inline)."""
from megasparse.data.sources.gcide import clean_entry
from megasparse.data.sources.rest import rest_to_text

REST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _label:

Title here
==========

.. toctree::
   :maxdepth: 2

   hidden-file-name

Read :ref:`the guide <guide-target>` and call :c:func:`kmalloc` with ``GFP_KERNEL``.
See `the site <https://example.org>`_ for **bold** and *emphasis*.

.. note::
   Kept body text.

.. function:: frobnicate(x, y)

   Frobnicates x and y.

Example::

    int x = 1;
"""


def test_rest_to_text_keeps_prose_and_drops_markup():
    text = rest_to_text(REST)
    for kept in ("Title here", "Read the guide and call kmalloc with GFP_KERNEL.",
                 "See the site for bold and emphasis.", "Kept body text.", "frobnicate(x, y)",
                 "Frobnicates x and y.", "Example:\n", "    int x = 1;"):
        assert kept in text, kept
    for dropped in ("SPDX", "_label", "====", "toctree", "maxdepth", "hidden-file-name", ":ref:", "``", ".. "):
        assert dropped not in text, dropped


def test_gcide_entry_cleaning():
    raw = ('Abbess \\Ab"bess\\, n. [OF. abaesse, F. abbesse.]\n'
           "   A female superior of a nunnery; caf['e] [=ae] {Abbot}.\n"
           "   [1913 Webster]\n")
    assert clean_entry(raw) == "Abbess, n. [OF. abaesse, F. abbesse.]\nA female superior of a nunnery; café ǣ Abbot."
