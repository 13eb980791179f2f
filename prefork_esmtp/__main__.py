"""``python -m prefork_esmtp``: the same CLI as the ``prefork-esmtp`` script."""

from prefork_esmtp.cli import main

main()
