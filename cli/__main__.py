"""Allow `python -m renderqa.cli`."""

from renderqa.cli.app import main

main()
