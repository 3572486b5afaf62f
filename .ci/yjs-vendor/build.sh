#!/bin/sh
# Regenerates service/static/vendor/yjs.js: yjs and y-websocket (versions pinned in package.json and
# package-lock.json here) bundled by esbuild into one minified ES module, so the demo page loads no
# CDN at run time. Needs Node and npm (the npm registry) once; the output is committed.
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
out=../../service/static/vendor/yjs.js
{
  echo "// yjs $(node -p "require('./node_modules/yjs/package.json').version"), y-websocket $(node -p "require('./node_modules/y-websocket/package.json').version"): MIT licensed; bundled by .ci/yjs-vendor/build.sh"
  ./node_modules/.bin/esbuild entry.mjs --bundle --format=esm --minify --target=es2020 --platform=browser --legal-comments=none
} > "$out"
echo "wrote $out ($(wc -c < "$out") bytes)"
