"""The sender: moves guest RAM pages the dirty bitmap says are still needed to the destination.

``wire`` is the sans-IO data-plane protocol, ``ram`` maps a guest RAM file by guest-physical page,
``pagehash`` fingerprints pages at memory speed, ``channel`` carries frames over TCP (source and
destination ends), and ``precopy`` runs the rounds.
"""
