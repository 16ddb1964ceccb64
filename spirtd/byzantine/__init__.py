"""Byzantine peers for experiments: attacks on training, kept out of the daemon.

Nothing in spirtd imports this package. A Byzantine peer is started only as

    SPIRT_I_UNDERSTAND_THIS_IS_AN_ATTACK=yes \\
        python -m spirtd.byzantine --experimental-attack NAME [spirtd arguments]

and refuses to start without that confirmation. ``attacks`` is the arithmetic of
each attack; ``harness`` patches the running daemon to send what it crafts.
"""
