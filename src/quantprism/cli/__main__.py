"""python -m quantprism.cli"""
import sys

from . import main

sys.exit(main())
