from mmloom.cli import main
import sys
sys.exit(main())
