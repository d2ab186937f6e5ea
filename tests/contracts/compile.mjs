// Compile Consumer.sol with the npm package solc (no download: the compiler is in the package)
// and print {compiler, abi, bytecode} as JSON: what consumer.json beside it holds.
// Usage: node compile.mjs <node_modules dir holding solc>
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(process.argv[2], 'solc', 'package.json'));
const solc = require('solc');
const input = {
  language: 'Solidity',
  sources: { 'Consumer.sol': { content: readFileSync(join(here, 'Consumer.sol'), 'utf8') } },
  settings: {
    optimizer: { enabled: false },
    evmVersion: 'paris',
    metadata: { bytecodeHash: 'none' },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
if (errors.length) {
  console.error(errors.map((e) => e.formattedMessage).join('\n'));
  process.exit(1);
}
const contract = output.contracts['Consumer.sol'].Consumer;
console.log(
  JSON.stringify(
    { compiler: `solc ${solc.version()}`, abi: contract.abi, bytecode: `0x${contract.evm.bytecode.object}` },
    null,
    1,
  ),
);
