import sys

from billingproxy.cli import main

sys.exit(main())
