#!/usr/bin/env bash
# Run once by the postgres image, when its data volume is first initialised
# (/docker-entrypoint-initdb.d): the group roles of least privilege, as `orders migrate
# --create-roles` makes them (it grants their privileges), and a login in each for the api and
# the projector, with the passwords of their Docker secrets. docs/security.md explains them.
set -euo pipefail

api_password="$(head -n 1 "$ORDERS_API_PASSWORD_FILE")"
projector_password="$(head -n 1 "$ORDERS_PROJECTOR_PASSWORD_FILE")"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v api_password="$api_password" -v projector_password="$projector_password" <<'SQL'
DO $$ BEGIN CREATE ROLE orders_migrator NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE orders_projector NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE orders_api NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE ROLE orders_api_login LOGIN PASSWORD :'api_password' IN ROLE orders_api;
CREATE ROLE orders_projector_login LOGIN PASSWORD :'projector_password' IN ROLE orders_projector;
SQL
