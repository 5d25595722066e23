import sys

if sys.argv[1:2] == ["verify"]:  # python -m raysft verify OUT
    from .verify import main as verify

    sys.exit(verify(sys.argv[2:]))
from .build import exit_now, main

exit_now(main())
