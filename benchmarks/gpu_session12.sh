#!/usr/bin/env bash
# Device session 12 (2 x H200, commit e7e434a): issue 12's data-parallel extract and layer tests
# again, with the layers dealt round-robin over the ranks: the same runs as session 11.
exec bash "$(dirname "$0")/gpu_session11.sh" "$@"
