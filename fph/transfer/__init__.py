"""The RAM transfer: moves guest RAM pages from the source RAM file to the destination RAM file.

``wire`` is the sans-IO data-plane protocol, ``ram_file`` maps a guest RAM file by guest-physical page,
``pagehash`` fingerprints pages at memory speed, ``channel`` holds what both ends share, ``sender`` is the
source end and ``receiver`` the destination end (also a process of its own). The precopy rounds that decide
what to send live in fph.migration.
"""
