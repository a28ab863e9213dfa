from __future__ import annotations

from nvr.cli.main import main

if __name__ == "__main__":
    main()
