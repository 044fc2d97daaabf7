// The TypeScript frame types, PROTOCOL.md and the relay's frame types agree. The relay's side is
// clients/frames.json, which a relay unit test keeps equal to its Rust types
// (`frame_catalogue_matches_the_frame_types`); here both the TypeScript types (by compiling a
// check generated from the catalogue) and PROTOCOL.md's examples are held against it.

import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';
import { ROOT } from './relay.js';

type Shape = string | Shape[] | { [field: string]: Shape };
type Catalogue = Record<'client' | 'server', Record<string, Record<string, Shape>>>;

const catalogue = JSON.parse(readFileSync(join(ROOT, 'clients', 'frames.json'), 'utf8')) as Catalogue;
const PACKAGE = resolve(import.meta.dirname, '..', '..');

function tsType(shape: Shape): string {
  if (typeof shape === 'string') return shape;
  if (Array.isArray(shape)) return `Array<${shape.length ? tsType(shape[0]!) : 'unknown'}>`;
  return `{ ${Object.entries(shape)
    .map(([field, inner]) => `${field}: ${tsType(inner)}`)
    .join('; ')} }`;
}

const union = (names: string[]) => (names.length ? names.map((n) => `'${n}'`).join(' | ') : 'never');

function checks(direction: 'client' | 'server'): string {
  const frames = catalogue[direction];
  const of = (name: string) =>
    direction === 'client' ? `Extract<ClientFrame, { type: '${name}' }>` : `ServerFrameOf<'${name}'>`;
  const lines = [
    `const ${direction}_types: Same<${direction === 'client' ? 'ClientFrame' : 'ServerFrame'}['type'], ${union(Object.keys(frames))}> = true;`,
  ];
  for (const [name, fields] of Object.entries(frames)) {
    const required = Object.keys(fields).filter((f) => !f.endsWith('?'));
    const optional = Object.keys(fields)
      .filter((f) => f.endsWith('?'))
      .map((f) => f.slice(0, -1));
    const shape = Object.entries(fields)
      .map(([f, s]) => `${f}: ${f === 'type' ? `'${name}'` : tsType(s)}`)
      .join('; ');
    const id = `${direction}_${name}`;
    lines.push(
      `const ${id}_required: Same<Req<${of(name)}>, ${union(required)}> = true;`,
      `const ${id}_optional: Same<Opt<${of(name)}>, ${union(optional)}> = true;`,
      `const ${id}_shape: ${of(name)} extends { ${shape} } ? true : false = true;`,
    );
  }
  return lines.join('\n');
}

test('the TypeScript frame types match the relay frames, field by field', () => {
  const dir = join(PACKAGE, 'build', 'frames-check');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'check.ts');
  writeFileSync(
    file,
    [
      `import type { ClientFrame, ServerFrame, ServerFrameOf } from '../../src/frames.js';`,
      `type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;`,
      `type Opt<T> = { [K in keyof T]-?: {} extends Pick<T, K> ? K : never }[keyof T];`,
      `type Req<T> = Exclude<keyof T, Opt<T>>;`,
      checks('client'),
      checks('server'),
      '',
    ].join('\n'),
  );
  const program = ts.createProgram([file], {
    strict: true,
    exactOptionalPropertyTypes: true,
    noEmit: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    types: [],
    noUnusedLocals: false,
  });
  const problems = ts
    .getPreEmitDiagnostics(program)
    .map((d) => {
      const where = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start) : undefined;
      const line = where ? d.file!.text.split('\n')[where.line]!.slice(0, 120) : '';
      return `${ts.flattenDiagnosticMessageText(d.messageText, '\n').split('\n')[0]}\n    at: ${line}`;
    });
  assert.deepEqual(problems, [], `src/frames.ts disagrees with clients/frames.json:\n${problems.join('\n')}`);
});

/** Every JSON frame example in PROTOCOL.md (placeholders like `<uuid>` read as 0). */
function documentedFrames(): Array<Record<string, unknown>> {
  const doc = readFileSync(join(ROOT, 'PROTOCOL.md'), 'utf8');
  const frames: Array<Record<string, unknown>> = [];
  for (let start = doc.indexOf('{"type"'); start >= 0; start = doc.indexOf('{"type"', start + 1)) {
    let depth = 0;
    let end = start;
    for (; end < doc.length; end++) {
      if (doc[end] === '{') depth++;
      if (doc[end] === '}' && --depth === 0) break;
    }
    const text = doc.slice(start, end + 1).replace(/<[^>"]*>/g, '0');
    try {
      frames.push(JSON.parse(text) as Record<string, unknown>);
    } catch {
      assert.fail(`PROTOCOL.md has a frame example that is not JSON: ${text.slice(0, 100)}`);
    }
  }
  return frames;
}

function kind(value: unknown): Shape {
  if (Array.isArray(value)) return value.length ? [kind(value[0])] : [];
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, kind(v)]));
  }
  return typeof value;
}

test('PROTOCOL.md shows every frame with exactly the relay fields', () => {
  const documented = new Map<string, Map<string, Shape>>();
  for (const frame of documentedFrames()) {
    const fields = documented.get(String(frame.type)) ?? new Map<string, Shape>();
    documented.set(String(frame.type), fields);
    for (const [field, value] of Object.entries(frame)) fields.set(field, kind(value));
  }
  const all = { ...catalogue.client, ...catalogue.server };
  assert.deepEqual([...documented.keys()].sort(), Object.keys(all).sort(), 'frame types documented = frame types');
  for (const [name, fields] of Object.entries(all)) {
    const expected = Object.fromEntries(Object.entries(fields).map(([f, s]) => [f.replace(/\?$/, ''), s]));
    const shown = Object.fromEntries(documented.get(name)!);
    // An empty example array (`"seqs":[]`) says nothing about its items.
    for (const [f, s] of Object.entries(shown)) if (Array.isArray(s) && s.length === 0) shown[f] = expected[f]!;
    assert.deepEqual(shown, expected, `PROTOCOL.md's "${name}" examples, together, show its fields and their JSON types`);
  }
});
