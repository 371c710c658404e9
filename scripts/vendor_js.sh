#!/usr/bin/env bash
# Re-fetches the JavaScript libraries the HTML report inlines (prov4ml_dist/report/vendor/),
# at the pinned versions below, from the npm registry with `npm pack`; keeps each library's
# minified build and its LICENSE, and records name, version and sha256 in vendor/VERSIONS.
#   bash scripts/vendor_js.sh          (needs npm; the page itself never touches the network)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd -P)
dest="$repo/prov4ml_dist/report/vendor"
# name version file-in-package -> vendored name
libs=(
  "uplot 1.6.32 dist/uPlot.iife.min.js uPlot.iife.min.js"
  "uplot 1.6.32 dist/uPlot.min.css uPlot.min.css"
  "cytoscape 3.35.0 dist/cytoscape.min.js cytoscape.min.js"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
: > "$work/VERSIONS"
for spec in "${libs[@]}"; do
  read -r name version inner out <<<"$spec"
  if [ ! -d "$work/$name" ]; then
    (cd "$work" && npm pack --silent "$name@$version" >/dev/null)
    mkdir "$work/$name" && tar xzf "$work/$name-$version.tgz" -C "$work/$name"
    cp "$work/$name/package/LICENSE" "$dest/LICENSE.$name"
  fi
  cp "$work/$name/package/$inner" "$dest/$out"
  echo "$name $version $out $(sha256sum "$dest/$out" | cut -d' ' -f1)" >> "$work/VERSIONS"
done
cp "$work/VERSIONS" "$dest/VERSIONS"
cat "$dest/VERSIONS"
