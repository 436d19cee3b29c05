-- The walkthrough's catalog: products and their prices, in a database that viewcar follows by
-- logical replication. `psql -f schema.sql` as a role with CREATE on the database.
CREATE TABLE products (
    id       int PRIMARY KEY,
    name     text NOT NULL,
    brand    text,
    category text,
    active   boolean NOT NULL DEFAULT true,
    attrs    jsonb
);

CREATE TABLE prices (
    product_id int PRIMARY KEY REFERENCES products (id),
    amount     numeric(10, 2) NOT NULL,
    currency   text NOT NULL DEFAULT 'EUR'
);

INSERT INTO products VALUES
    (1, 'Trail shoe', 'acme', 'shoes', true, '{"sizes": [41, 42, 43]}'),
    (2, 'Rain jacket', 'acme', 'jackets', true, '{"waterproof": true}'),
    (3, 'Old boot', 'bolt', 'shoes', false, NULL);

INSERT INTO prices VALUES (1, 89.90, 'EUR'), (2, 129.00, 'EUR'), (3, 40.00, 'EUR');
