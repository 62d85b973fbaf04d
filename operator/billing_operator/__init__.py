"""The kopf operator: Wallet and ApiKey resources reconciled into PostgreSQL and key Secrets."""
