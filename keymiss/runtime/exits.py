"""Exit statuses of ``keymiss serve`` and ``keymiss worker``, one table for every front end, so a
supervisor reads the same number for the same failure whichever front end ran."""

#: the server could not be started, or kept dying, or the workers stopped on their own, or a server
#: keymiss cannot restart refused their login
EXIT_SERVER_FAILED = 1

#: shutdown had to abandon handler calls (or executor threads) stuck past their timeout
EXIT_ABANDONED = 3
