"""`quantprism build`: the target matrix in one command (runner), one process per target (worker), reports."""
