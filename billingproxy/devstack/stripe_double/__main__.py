from billingproxy.devstack.stripe_double import server

raise SystemExit(server.main())
